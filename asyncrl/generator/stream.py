"""The rollout: what runs in the engine, and when a unit of work is complete.

`Rollout` drives the engine's request-level loop (continuous batching). The work is made of
units (`Unit`): a unit starts with some sequences (engine requests), each sequence is stepped
until it finishes, and a unit is complete, and handed back by `take_finished`, when all its
sequences are done and it asks for no more. A unit kind says what its sequences are and what
a finished sequence leads to:

  SampleGroup   the `group_size` completions of one training prompt (GRPO's group).
  EvalBatch     one greedy completion per held-out problem, under one policy version
                (asyncrl/generator/evaluate.py); outside the generator.max_inflight budget
                (the engine's scheduler runs what it can next to the training sequences).

A unit kind whose finished sequence leads to another request (an episode's next turn after an
environment step) returns it from `Unit.sequence_done`, and the rollout submits it.

Every token is tagged with the policy version of the weights that sampled it, so a completion
may span several versions. Weights can change while requests are in flight
(`generator.inflight_update`):
  keep   the running requests continue with their KV cache (computed by the old weights);
         the tokens sampled after the update carry the new version (PipelineRL; vLLM's
         keep-pause).
  abort  the running requests are aborted before the load and resubmitted after it with
         their tokens so far appended to the prompt, so the new weights recompute the prefix
         (AReaL): the tokens sampled after the update carry the new version and their
         behaviour logprobs are exactly the new policy's.
  drain  the running requests finish under the old weights before the load (no new ones
         start meanwhile): every completion has one version, as with batch generation.
A unit that must be of one version (`Unit.one_version`: an evaluation) always finishes under
the old weights before a load, whatever the mode.

With LoRA adapters (model.lora) a push does not change the weights running requests use: it
adds the new version's adapter beside the old ones (asyncrl/generator/engine.py Adapters).
Each request runs on the adapter of the version it was submitted under and its tokens carry
that version: with `keep` a running request finishes on its adapter, with `abort` it is
resubmitted on the new one.

`Rollout` holds no sockets and imports no vllm: the engine is anything with add / step /
abort (asyncrl/generator/engine.py's VLLMEngine), so tests drive it with a fake.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

INFLIGHT_UPDATES = ("keep", "abort", "drain")


@dataclass
class Sequence:
    """One completion being generated (one engine request, resubmitted after an abort)."""

    prompt: list[int]
    max_tokens: int
    temperature: float = 1.0
    request_id: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)  # the policy version of every token
    finish_reason: str = ""  # "" while running
    submitted: int = 0  # the policy version its current request was submitted under

    @property
    def done(self) -> bool:
        return bool(self.finish_reason)


class Unit:
    """A unit of work in the engine: complete when every sequence is done."""

    one_version = False  # must be sampled under one policy version (finishes before a load)
    budgeted = True  # its running sequences count toward generator.max_inflight
    evaluation = False  # a held-out evaluation (its result goes to the learner, not the buffer)

    def __init__(self, seqs: list[Sequence]):
        self.seqs = seqs

    @property
    def done(self) -> bool:
        return all(s.done for s in self.seqs)

    def sequence_done(self, seq: Sequence) -> list[Sequence]:
        """A sequence of this unit finished: the new sequences it leads to (none here)."""
        return []

    @property
    def waiting(self) -> bool:
        """Waiting on something outside the engine (an environment step)."""
        return False

    def poll(self, version: int) -> list[Sequence]:
        """Between engine steps: the new sequences what it waited on leads to (its next
        requests; `version` is the one the engine holds)."""
        return []

    def slots(self) -> int:
        """How many of generator.max_inflight it occupies: its sequences not done (a
        multi-turn unit counts its episodes waiting on the environment too)."""
        return sum(not s.done for s in self.seqs)

    def first_token(self, at: float) -> None:
        """The first token of this unit was sampled at `at` (clock time)."""


class SampleGroup(Unit):
    """The group_size completions of one training prompt."""

    def __init__(self, key: object, prompt: list[int], version: int, group_size: int,
                 temperature: float, max_tokens: int, started_at: float):
        super().__init__([Sequence(list(prompt), max_tokens, temperature)
                          for _ in range(group_size)])
        self.key, self.prompt, self.version = key, list(prompt), version
        self.started_at = started_at
        self.first_token_at: float | None = None

    def first_token(self, at: float) -> None:
        if self.first_token_at is None:
            self.first_token_at = at

    @property
    def oldest_version(self) -> int:
        return min((v for s in self.seqs for v in s.versions), default=self.version)


class EvalBatch(Unit):
    """One greedy completion per held-out problem; every token from one policy version."""

    one_version = True
    budgeted = False
    evaluation = True

    def __init__(self, prompts: list[list[int]], max_tokens: int):
        super().__init__([Sequence(list(p), max_tokens, 0.0) for p in prompts])


class Rollout:
    def __init__(self, engine, max_inflight: int, inflight_update: str,
                 clock: Callable[[], float], salt_versions: bool = False,
                 adapters: bool = False):
        if inflight_update not in INFLIGHT_UPDATES:
            raise ValueError(f"generator.inflight_update={inflight_update!r}: choose one of "
                             f"{INFLIGHT_UPDATES}")
        self.engine, self.max_inflight = engine, max_inflight
        # With the engine's prefix cache on, each request is salted with the policy version
        # it starts under (vLLM's cache_salt): KV computed by other weights is never reused.
        self.salt_versions = salt_versions
        # model.lora: each request runs on the adapter of the version it was submitted under
        # (the engine is told which), and its tokens carry that version.
        self.adapters = adapters
        self.version = 0  # the policy version the engine holds, as the loop last said
        self.mode, self.clock = inflight_update, clock
        self.running: dict[str, tuple[Unit, Sequence]] = {}
        self.units: list[Unit] = []  # started, not yet finished
        self.finished: list[Unit] = []  # complete, not yet taken
        self._ids = itertools.count()
        self._aborted: list[tuple[Unit, Sequence]] = []
        self.updates_in_flight = 0  # weight loads that found sequences running
        self.prompt_tokens = 0  # prompt tokens of every request submitted
        self.cached_tokens = 0  # of those, served by the engine's prefix cache
        self.one_version_wait_s = 0.0  # time loads waited for one-version units to finish

    # ------------------------------------------------------------------ adding work

    def budgeted_running(self) -> int:
        """The slots of generator.max_inflight taken (running sequences and episodes
        waiting on their environment)."""
        return sum(u.slots() for u in self.units if u.budgeted)

    def room(self, sequences: int) -> bool:
        """Whether `sequences` more fit under generator.max_inflight."""
        return self.budgeted_running() + sequences <= self.max_inflight

    def start(self, unit: Unit, version: int | None = None) -> Unit:
        """Submit a unit's sequences (`version`: the one the engine holds, when the loop
        knows it better than the last step)."""
        if version is not None:
            self.version = version
        for s in unit.seqs:
            self._submit(unit, s)
        self.units.append(unit)
        return unit

    def _submit(self, unit: Unit, s: Sequence) -> None:
        s.request_id = f"r{next(self._ids)}"
        self.running[s.request_id] = (unit, s)
        # The prompt plus what was already sampled (after an abort, the prefix is recomputed).
        extra = {"cache_salt": f"v{self.version}"} if self.salt_versions else {}
        if self.adapters:
            extra["version"] = self.version
        s.submitted = self.version
        self.prompt_tokens += len(s.prompt) + len(s.tokens)
        self.engine.add(s.request_id, s.prompt + s.tokens, s.temperature,
                        s.max_tokens - len(s.tokens), **extra)

    # ------------------------------------------------------------------ stepping

    @property
    def busy(self) -> bool:
        """Requests in the engine, or units waiting on something outside it."""
        return bool(self.running) or any(u.waiting for u in self.units)

    def step(self, version: int) -> None:
        """One engine step (when requests run); every token it produced is tagged `version`.
        Then what waited outside the engine is polled and its new requests submitted. The
        units completed are taken with `take_finished`."""
        self.version = version
        if self.running:
            self._advance(version)
        for u in self.units:
            for s in u.poll(version):
                self._submit(u, s)
        self._collect()

    def _advance(self, version: int) -> None:
        now = None
        for d in self.engine.step():
            if d.request_id not in self.running:
                continue  # an aborted request's last output
            unit, s = self.running[d.request_id]
            self.cached_tokens += d.cached_tokens
            if d.tokens:
                now = now or self.clock()
                unit.first_token(now)
            s.tokens += d.tokens
            s.logprobs += d.logprobs
            s.versions += [s.submitted if self.adapters else version] * len(d.tokens)
            if d.finished:
                del self.running[d.request_id]
                self._end(unit, s, d.finish_reason or "length")
        self._collect()

    def _end(self, unit: Unit, s: Sequence, reason: str) -> None:
        s.finish_reason = reason
        for nxt in unit.sequence_done(s):
            unit.seqs.append(nxt)
            self._submit(unit, nxt)

    def _collect(self) -> None:
        done = [u for u in self.units if u.done]
        if done:
            self.units = [u for u in self.units if not u.done]
            self.finished += done

    def take_finished(self) -> list[Unit]:
        """The units completed since the last call, in the order they were started."""
        done, self.finished = self.finished, []
        return done

    # ------------------------------------------------------------------ weight updates

    def before_update(self, version: int) -> None:
        """Called between two steps, before new weights are loaded; `version` is the one
        still loaded. One-version units (evaluations) finish first, the others stepping along
        under the same old weights; then the in-flight mode applies."""
        if any(u.one_version for u, _ in self.running.values()):
            t0 = self.clock()
            while any(u.one_version for u, _ in self.running.values()):
                self._advance(version)
            self.one_version_wait_s += self.clock() - t0
        if self.running:
            self.updates_in_flight += 1
        if self.mode == "abort":
            self._aborted = list(self.running.values())
            self.engine.abort(list(self.running))
            self.running.clear()
        elif self.mode == "drain":
            while self.running:
                self._advance(version)

    def after_update(self, version: int | None = None) -> None:
        """Called once the new weights (`version`) are live: abort mode resubmits what it
        aborted."""
        if version is not None:
            self.version = version
        aborted, self._aborted = self._aborted, []
        for unit, s in aborted:
            if len(s.tokens) >= s.max_tokens:
                self._end(unit, s, "length")
            else:
                self._submit(unit, s)
        self._collect()
