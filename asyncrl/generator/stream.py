"""Streaming generation: continuous batching over the engine's request-level loop.

The generator keeps up to `generator.max_inflight` sequences running. Each prompt becomes
`group_size` requests (one per completion); whenever there is room, new prompts are added
between engine steps; a group is handed back the moment its last completion finishes, while
the others keep running. Every token is tagged with the policy version of the weights that
sampled it, so a completion may span several versions.

Weights can change while requests are in flight (`generator.inflight_update`):
  keep   the running requests continue with their KV cache (computed by the old weights);
         the tokens sampled after the update carry the new version (PipelineRL; vLLM's
         keep-pause).
  abort  the running requests are aborted before the load and resubmitted after it with
         their tokens so far appended to the prompt, so the new weights recompute the prefix
         (AReaL): the tokens sampled after the update carry the new version and their
         behaviour logprobs are exactly the new policy's.
  drain  the running requests finish under the old weights before the load (no new ones
         start meanwhile): every completion has one version, as with batch generation.

Held-out evaluation runs among the training requests (`start_eval`): one greedy request per
problem, outside the max_inflight budget (the engine's scheduler runs what it can next to the
training sequences). An evaluation must see one policy version, so whatever the mode, running
evaluation requests finish under the old weights before a load (`before_update`).

`Streamer` holds no sockets and imports no vllm: the engine is anything with
add / step / abort (asyncrl/generator/engine.py's VLLMEngine), so tests drive it with a fake.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

INFLIGHT_UPDATES = ("keep", "abort", "drain")


@dataclass
class Sequence:
    """One completion being generated."""

    prompt: list[int]
    max_tokens: int
    request_id: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)  # the policy version of every token
    finish_reason: str = ""  # "" while running

    @property
    def done(self) -> bool:
        return bool(self.finish_reason)


@dataclass
class StreamGroup:
    """The group_size completions of one prompt."""

    key: object  # the caller's (e.g. the problem)
    prompt: list[int]
    version: int  # the policy version when the group was started
    seqs: list[Sequence]
    started_at: float
    first_token_at: float | None = None

    @property
    def done(self) -> bool:
        return all(s.done for s in self.seqs)

    @property
    def oldest_version(self) -> int:
        return min((v for s in self.seqs for v in s.versions), default=self.version)


class Streamer:
    def __init__(self, engine, group_size: int, temperature: float, max_tokens: int,
                 max_inflight: int, inflight_update: str, clock: Callable[[], float]):
        if inflight_update not in INFLIGHT_UPDATES:
            raise ValueError(f"generator.inflight_update={inflight_update!r}: choose one of "
                             f"{INFLIGHT_UPDATES}")
        self.engine, self.group_size, self.temperature = engine, group_size, temperature
        self.max_tokens, self.max_inflight = max_tokens, max_inflight
        self.mode, self.clock = inflight_update, clock
        self.running: dict[str, tuple[StreamGroup, Sequence]] = {}
        self.groups: list[StreamGroup] = []  # started, not yet handed back
        self._ids = itertools.count()
        self._aborted: list[Sequence] = []
        self.updates_in_flight = 0  # weight loads that found sequences running
        # Greedy evaluation requests: id -> (caller's key, sequence); finished ones until taken.
        self.eval_running: dict[str, tuple[object, Sequence]] = {}
        self.eval_done: list[tuple[object, Sequence]] = []
        self.eval_drain_s = 0.0  # time weight loads waited for evaluation requests to finish

    # ------------------------------------------------------------------ adding work

    def room(self) -> bool:
        """Whether one more group fits under generator.max_inflight."""
        return len(self.running) + self.group_size <= self.max_inflight

    def start(self, key: object, prompt: list[int], version: int) -> StreamGroup:
        g = StreamGroup(key, list(prompt), version,
                        [Sequence(list(prompt), self.max_tokens) for _ in range(self.group_size)],
                        self.clock())
        for s in g.seqs:
            self._submit(g, s)
        self.groups.append(g)
        return g

    def start_eval(self, key: object, prompt: list[int], max_tokens: int) -> None:
        """One greedy request (temperature 0); it comes back through `take_evals`."""
        s = Sequence(list(prompt), max_tokens, request_id=f"e{next(self._ids)}")
        self.eval_running[s.request_id] = (key, s)
        self.engine.add(s.request_id, s.prompt, 0.0, max_tokens)

    def take_evals(self) -> list[tuple[object, Sequence]]:
        """The evaluation requests finished since the last call: (key, sequence)."""
        done, self.eval_done = self.eval_done, []
        return done

    def _submit(self, g: StreamGroup, s: Sequence) -> None:
        s.request_id = f"r{next(self._ids)}"
        self.running[s.request_id] = (g, s)
        # The prompt plus what was already sampled (after an abort, the prefix is recomputed).
        self.engine.add(s.request_id, s.prompt + s.tokens, self.temperature,
                        s.max_tokens - len(s.tokens))

    # ------------------------------------------------------------------ stepping

    @property
    def busy(self) -> bool:
        return bool(self.running or self.eval_running)

    def step(self, version: int) -> list[StreamGroup]:
        """One engine step; every token it produced is tagged `version`. Returns the groups
        whose last completion finished in it (in the order they were started)."""
        now = None
        for d in self.engine.step():
            if d.request_id in self.eval_running:
                key, s = self.eval_running[d.request_id]
                s.tokens += d.tokens
                s.versions += [version] * len(d.tokens)
                if d.finished:
                    s.finish_reason = d.finish_reason or "length"
                    self.eval_done.append(self.eval_running.pop(d.request_id))
                continue
            if d.request_id not in self.running:
                continue  # an aborted request's last output
            g, s = self.running[d.request_id]
            if d.tokens and g.first_token_at is None:
                g.first_token_at = now = now or self.clock()
            s.tokens += d.tokens
            s.logprobs += d.logprobs
            s.versions += [version] * len(d.tokens)
            if d.finished:
                s.finish_reason = d.finish_reason or "length"
                del self.running[d.request_id]
        return self._take_done()

    def _take_done(self) -> list[StreamGroup]:
        done = [g for g in self.groups if g.done]
        if done:
            self.groups = [g for g in self.groups if not g.done]
        return done

    # ------------------------------------------------------------------ weight updates

    def before_update(self, version: int) -> list[StreamGroup]:
        """Called between two steps, before new weights are loaded; `version` is the one still
        loaded. Returns the groups that finished meanwhile (drain mode steps the engine until
        nothing runs). Evaluation requests always finish first: an evaluation is of one
        version (the training sequences step along meanwhile, under the same old weights)."""
        done = []
        if self.eval_running:
            t0 = self.clock()
            while self.eval_running:
                done += self.step(version)
            self.eval_drain_s += self.clock() - t0
        if self.running:
            self.updates_in_flight += 1
        if self.mode == "abort":
            self._aborted = [s for _, s in self.running.values()]
            self.engine.abort(list(self.running))
            self.running.clear()
            return done
        if self.mode == "drain":
            while self.running:
                done += self.step(version)
        return done

    def after_update(self) -> None:
        """Called once the new weights are live: abort mode resubmits what it aborted."""
        aborted, self._aborted = self._aborted, []
        by_seq = {id(s): g for g in self.groups for s in g.seqs}
        for s in aborted:
            if len(s.tokens) >= s.max_tokens:
                s.finish_reason = "length"
            else:
                self._submit(by_seq[id(s)], s)
