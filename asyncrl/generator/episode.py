"""Multi-turn episodes: a rollout kind (asyncrl/generator/stream.py) whose unit is a group of
`group_size` episodes of one problem, each several engine requests and environment steps.

Token in, token out. An episode keeps the exact token ids of everything after its prompt:
the tokens each turn sampled (with their behaviour logprobs and the policy version of each)
and the observation tokens the environment's answers became (tokenized once, when they
arrive: `Codec.observation`). Each turn's request is the prompt plus all of those ids, never
a decoded and re-encoded transcript, so the learner trains on the ids the engine saw. Every
token carries its source (`SAMPLED`: loss, KL, entropy, staleness; `INJECTED`: none of them).

Environment calls (reset, step, score) run in threads (asyncrl/env/pool.py) and are polled
between engine steps; a raising environment ends its episode with finish reason `env_error`,
a hanging one with `env_timeout` (reward 0). Budgets: generator.max_turns turns,
generator.max_tokens sampled tokens per turn, generator.max_episode_tokens tokens after the
prompt; an episode that hits one ends with `max_turns` or `length` (truncated: DAPO's
overlong shaping applies). An observation longer than env.max_observation_tokens is cut
there (counted).

In-flight updates keep their meaning: the running turn of each episode is one engine request,
kept, aborted and resubmitted with its tokens so far, or drained, like any other; between two
turns an episode holds no request, so the next turn simply starts on the new weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from asyncrl import wire
from asyncrl.config import RunConfig
from asyncrl.env import EnvSpec, Step
from asyncrl.env.pool import Call
from asyncrl.generator.stream import Sequence, Unit

SAMPLED, INJECTED = 0, 1
FINISH_REASONS = ("stop", "length", "max_turns", "env_error", "env_timeout")


@dataclass
class Budgets:
    max_turns: int
    turn_tokens: int  # generator.max_tokens: sampled tokens per turn
    episode_tokens: int  # generator.max_episode_tokens: every token after the prompt
    observation_tokens: int  # env.max_observation_tokens
    step_timeout_s: float
    context_tokens: int = 1 << 30  # the engine's max_model_len: prompt + episode fit in it


@dataclass
class Codec:
    """Text <-> ids for an episode: the first prompt as the generators encode prompts, a
    model turn decoded without special tokens, an observation encoded once (with the chat
    template's delimiters for the observation role when the model has one)."""

    prompt: Callable[[object], list[int]]
    decode: Callable[[list[int]], str]
    observation: Callable[[str], list[int]]
    vocab_size: int = 1 << 31  # token ids an environment gives must be below it


def _finite(value) -> float:
    """A reward an environment gave, as a float; ValueError for anything else."""
    x = float(value)
    if x != x or x in (float("inf"), float("-inf")):
        raise ValueError(f"a reward of {value!r}")
    return x


class Episode:
    """One episode: its tokens so far, the running turn, the environment call pending."""

    def __init__(self, env, problem, codec: Codec, budgets: Budgets, temperature: float):
        self.env, self.problem, self.codec, self.budgets = env, problem, codec, budgets
        self.temperature = temperature
        self.prompt: list[int] = []
        self.ids: list[int] = []  # every token after the prompt
        self.logprobs: list[float] = []
        self.versions: list[int] = []
        self.sources: list[int] = []
        self.turns = 0
        self.reward = 0.0
        self.finish_reason = ""
        self.call: Call | None = Call(lambda: env.reset(problem), budgets.step_timeout_s)
        self.call_kind = "reset"
        self.truncated_observations = 0
        self.env_seconds: list[float] = []  # each environment call's wall time

    @property
    def done(self) -> bool:
        return bool(self.finish_reason)

    @property
    def waiting(self) -> bool:
        return self.call is not None

    def turn_done(self, seq: Sequence) -> None:
        """The running turn finished: keep its tokens, then hand its text to the environment."""
        self.ids += seq.tokens
        self.logprobs += seq.logprobs
        self.versions += seq.versions
        self.sources += [SAMPLED] * len(seq.tokens)
        self.turns += 1
        if seq.finish_reason == "length" and len(seq.tokens) >= seq.max_tokens:
            self.finish_reason = "length"  # a turn cut by its budget
            self.call, self.call_kind = Call(self.env.score, self.budgets.step_timeout_s), "score"
            return
        text = self.codec.decode(seq.tokens)
        self.call = Call(lambda: self.env.step(text), self.budgets.step_timeout_s)
        self.call_kind = "step"

    def poll(self, version: int) -> Sequence | None:
        """The environment call's outcome, if it came: the next turn's request, or None."""
        if self.call is None:
            return None
        state, value = self.call.result()
        if state == "pending":
            return None
        self.env_seconds.append(self.call.clock() - self.call.started)
        self.call, kind = None, self.call_kind
        if state != "ok":
            self.reward, self.finish_reason = 0.0, f"env_{state}"
            return None
        if kind == "reset":
            self.prompt = list(self.codec.prompt(value))
            return self._next_turn()
        try:
            if kind == "score":
                self.reward += _finite(value)
                self.finish_reason = self.finish_reason or "stop"
                return None
            return self._after_step(value, version)
        except (TypeError, ValueError):  # an environment's garbage: its episode ends
            self.reward, self.finish_reason, self.call = 0.0, "env_error", None
            return None

    def _after_step(self, step: Step, version: int) -> Sequence | None:
        if not isinstance(step, Step):
            self.reward, self.finish_reason = 0.0, "env_error"
            return None
        self.reward += _finite(step.reward)
        if step.done:
            self.call, self.call_kind = Call(self.env.score, self.budgets.step_timeout_s), "score"
            return None
        ids = self._observation_ids(step.observation)
        if len(ids) > self.budgets.observation_tokens:
            ids = ids[: self.budgets.observation_tokens]
            self.truncated_observations += 1
        room = min(self.budgets.episode_tokens - len(self.ids),
                   self.budgets.context_tokens - len(self.prompt) - len(self.ids))
        if len(ids) >= room:  # the episode's budget ends inside the observation
            ids = ids[: max(0, room)]
            self._inject(ids, version)
            return self._end("length")
        self._inject(ids, version)
        if self.turns >= self.budgets.max_turns:
            return self._end("max_turns")
        return self._next_turn()

    def _observation_ids(self, obs) -> list[int]:
        """Text (tokenized once) or token ids, each a valid id of the model; anything else
        is the environment's error (ValueError)."""
        if obs is None or isinstance(obs, str):
            return list(self.codec.observation(obs or ""))
        if not isinstance(obs, list) or not all(
                type(t) is int and 0 <= t < self.codec.vocab_size for t in obs):
            raise ValueError("an observation is text or a list of the model's token ids")
        return list(obs)

    def _inject(self, ids: list[int], version: int) -> None:
        inject(self, ids, version)

    def _next_turn(self) -> Sequence | None:
        used = len(self.ids)
        room = min(self.budgets.episode_tokens - used,
                   self.budgets.context_tokens - len(self.prompt) - used)
        if room <= 0:
            return self._end("length")
        return Sequence(self.prompt + self.ids, min(self.budgets.turn_tokens, room),
                        self.temperature)

    def _end(self, reason: str) -> None:
        self.finish_reason = reason
        self.call, self.call_kind = Call(self.env.score, self.budgets.step_timeout_s), "score"
        return None

    @property
    def finished(self) -> bool:
        """Over and scored."""
        return self.done and self.call is None

    def parts(self) -> dict[str, float]:
        """The episode's reward and its figures (`episode_*`, logged as they are by rank 0):
        turns, and the tool calls the environment answered and those it answered with an
        error, when it counts them (`tool_calls`, `tool_errors` attributes)."""
        out = {"env": self.reward, "episode_turns": float(self.turns)}
        for name in ("tool_calls", "tool_errors"):
            value = getattr(self.env, name, None)
            if isinstance(value, (int, float)):
                out[f"episode_{name}"] = float(value)
        return out

    def completion(self) -> wire.Completion:
        return completion_of(self)


def inject(e, ids: list[int], version: int) -> None:
    """Tokens the model did not sample (an observation, an agent's text) appended to an
    episode: no logprob, the version of the turn before them."""
    last = e.versions[-1] if e.versions else version
    e.ids += ids
    e.logprobs += [0.0] * len(ids)
    e.versions += [last] * len(ids)
    e.sources += [INJECTED] * len(ids)


def completion_of(e) -> wire.Completion:
    """An episode (an environment's or an agent's, asyncrl/generator/endpoint.py) as it
    travels: everything after its prompt, with logprobs, versions and sources."""
    return wire.Completion(np.asarray(e.ids, np.int32), np.asarray(e.logprobs, np.float32),
                           e.reward, e.finish_reason, np.asarray(e.versions, np.int64),
                           reward_parts=e.parts(), sources=np.asarray(e.sources, np.uint8))


class EpisodeGroup(Unit):
    """Episodes run together: a training group is group_size episodes of one problem
    (`problems` = [problem] * group_size); complete when every one is over and scored."""

    def __init__(self, key: object, problems: list, env_spec: EnvSpec, codec: Codec,
                 budgets: Budgets, temperature: float, version: int, started_at: float):
        super().__init__([])
        self.key, self.version, self.started_at = key, version, started_at
        self.first_token_at: float | None = None
        self.episodes = [Episode(env_spec.make(), p, codec, budgets, temperature)
                         for p in problems]
        self._of: dict[int, Episode] = {}  # id(turn sequence) -> its episode

    @property
    def done(self) -> bool:
        return all(e.finished for e in self.episodes)

    @property
    def waiting(self) -> bool:
        return any(e.waiting for e in self.episodes)

    def slots(self) -> int:
        return sum(not e.finished for e in self.episodes)

    def first_token(self, at: float) -> None:
        if self.first_token_at is None:
            self.first_token_at = at

    def sequence_done(self, seq: Sequence) -> list[Sequence]:
        self._of.pop(id(seq)).turn_done(seq)
        return []

    def poll(self, version: int) -> list[Sequence]:
        out = []
        for e in self.episodes:
            nxt = e.poll(version)
            if nxt is not None:
                self._of[id(nxt)] = e
                self.seqs.append(nxt)
                out.append(nxt)
        return out

    @property
    def oldest_version(self) -> int:
        return min((v for e in self.episodes for v, s in zip(e.versions, e.sources)
                    if s == SAMPLED), default=self.version)

    def trajectory(self, name: str) -> wire.TrajectoryGroup:
        """The finished group as it travels: one completion per episode, everything after
        the prompt with its sources; its policy version is its oldest sampled token's."""
        prompts = {tuple(e.prompt) for e in self.episodes if e.prompt}
        if len(prompts) > 1:
            raise ValueError("the episodes of one group started from different prompts")
        prompt = list(prompts.pop()) if prompts else list(self.episodes[0].codec.prompt(
            self.episodes[0].problem.prompt))  # every reset failed: the task's own prompt
        return wire.TrajectoryGroup(prompt_id=self.key, prompt_tokens=np.asarray(prompt, np.int32),
                                    policy_version=self.oldest_version,
                                    completions=[e.completion() for e in self.episodes],
                                    generator=name, created_at=time.time())


class EvalEpisodes(EpisodeGroup):
    """A held-out evaluation: one greedy episode per problem, all under one policy version
    (a weight load waits for it), outside the generator.max_inflight budget."""

    one_version = True
    budgeted = False
    evaluation = True

    def __init__(self, problems: list, env_spec: EnvSpec, codec: Codec, budgets: Budgets,
                 started_at: float = 0.0):
        super().__init__("eval", problems, env_spec, codec, budgets, 0.0, 0, started_at)

    def sampled_versions(self) -> set[int]:
        return {v for e in self.episodes for v, s in zip(e.versions, e.sources) if s == SAMPLED}


def episode_parts(cfg: RunConfig, tok, context_tokens: int = 1 << 30):
    """What every episode of the run shares: the environment, the codec, the budgets
    (context_tokens: the engine's max_model_len)."""
    from asyncrl.env import load_environment

    gc, spec = cfg.generator, load_environment(cfg.env.name, cfg.env.kwargs)
    return (spec, episode_codec(cfg, tok, spec.tools),
            Budgets(gc.max_turns, gc.max_tokens, gc.max_episode_tokens,
                    cfg.env.max_observation_tokens, cfg.env.step_timeout_s, context_tokens))


def episode_codec(cfg: RunConfig, tok, tools=()):
    """Text <-> ids for episodes, as the generators encode prompts (asyncrl/task); with
    task.chat_template an observation is the chat template's tool turn (`chat_observation`),
    and the environment's `tools` are in the prompt (env.tools_in_prompt)."""
    from asyncrl.task import chat_context, encode_prompt

    chat, context = cfg.task.chat_template, chat_context(cfg.task)
    schemas = [t.schema() for t in tools] if chat and cfg.env.tools_in_prompt else None
    return Codec(prompt=lambda text: encode_prompt(tok, text, chat, context, schemas),
                 decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
                 observation=(lambda text: chat_observation(tok, text)) if chat else
                 (lambda text: tok.encode(text, add_special_tokens=False)),
                 vocab_size=len(tok))


def chat_observation(tok, text: str) -> list[int]:
    """An observation as the chat template renders a tool turn after an assistant turn, and
    the assistant's next turn opened: what the template writes after the assistant's end of
    turn (its EOS, which the model sampled), the tool message, and the generation prompt.
    Tokenized once, here; the transcript before it is never re-rendered."""
    base = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    before = tok.apply_chat_template(base, tokenize=False)
    after = tok.apply_chat_template([*base, {"role": "tool", "content": text}], tokenize=False,
                                    add_generation_prompt=True)
    if not after.startswith(before) or tok.eos_token not in before:
        raise ValueError("the chat template does not render a tool turn after an assistant turn")
    # The model's turn ends with its EOS token; the template may write more after it ("\n").
    tail = before[before.rindex(tok.eos_token) + len(tok.eos_token):]
    return list(tok.encode(tail + after[len(before):], add_special_tokens=False))
