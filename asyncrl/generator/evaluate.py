"""Held-out evaluation on the inference side: greedy completions of the task's eval split under
the policy version the engine holds, scored with `task.eval_reward`.

The learner asks (an `eval_request` on the weight-sync control channel, right after it pushed
the version it wants evaluated) and never waits for the answer: the generator runs the
evaluation among its training requests and reports an `eval_result` tagged with the version
its engine held (asyncrl/learner/evals.py joins it into metrics.jsonl by version).

Streaming: the evaluation is one unit of the rollout, every problem one greedy request at
once (an `EvalBatch`, asyncrl/generator/stream.py); a weight load waits for those still
running (`Rollout.before_update`), so every token of an evaluation comes from one version,
which `collect` checks. Batch generation: one blocking generate call
between two training calls. Requests that come while one evaluation runs wait their turn.

Scoring is the learner's `greedy_accuracy`: the same prompt ids (`encode_prompt`), the
completion decoded without special tokens, the mean of the reward.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    asked: int  # the version the learner asked for
    version: int  # the version the engine held: that of every evaluated token
    accuracy: float  # mean eval_reward over the problems
    problems: int
    seconds: float  # from the first request to the last completion


@dataclass
class _Job:
    asked: int
    version: int
    started: float
    problems: int
    total: float = 0.0


class Evaluator:
    def __init__(self, prompts: list[list[int]], answers: list[str], decode: Callable,
                 reward: Callable[[str, str], float], max_tokens: int,
                 clock: Callable[[], float] = time.monotonic,
                 episodes: Callable[[], object] | None = None):
        """prompts: the eval split's prompt ids; decode(token ids) -> text; reward(text,
        answer) -> float (REWARD_FUNCTIONS[task.eval_reward]). episodes: with an environment
        (env.name), makes the evaluation's unit, an EvalEpisodes of one greedy episode per
        held-out problem, scored by the environment."""
        if len(prompts) != len(answers):
            raise ValueError("one answer per prompt")
        self.prompts, self.answers, self.decode, self.reward = prompts, answers, decode, reward
        self.max_tokens, self.clock, self.episodes = max_tokens, clock, episodes
        self.asked: list[int] = []  # versions asked for, not started yet
        self.job: _Job | None = None

    @classmethod
    def for_task(cls, cfg, tok, held_out: list, context_tokens: int = 1 << 30) -> Evaluator:
        """The run's evaluation: the held-out problems' prompt ids as the generators encode
        them, decoded without special tokens, scored with task.eval_reward, up to
        generator.max_tokens (the generator, the evaluator and the --posthoc benchmark)."""
        from asyncrl.rewards import REWARD_FUNCTIONS
        from asyncrl.task import chat_context, encode_prompt

        chat, context = cfg.task.chat_template, chat_context(cfg.task)
        episodes = None
        if cfg.env.name:
            from asyncrl.generator.episode import EvalEpisodes, episode_parts

            spec, codec, budgets = episode_parts(cfg, tok, context_tokens)
            episodes = lambda: EvalEpisodes(held_out, spec, codec, budgets)  # noqa: E731
        return cls([encode_prompt(tok, p.prompt, chat, context) for p in held_out],
                   [p.answer for p in held_out],
                   lambda ids: tok.decode(ids, skip_special_tokens=True),
                   REWARD_FUNCTIONS[cfg.task.eval_reward], cfg.generator.max_tokens,
                   episodes=episodes)

    def ask(self, version: int) -> None:
        self.asked.append(version)

    @property
    def running(self) -> bool:
        return self.job is not None

    def _score(self, i: int, tokens: list[int]) -> float:
        return float(self.reward(self.decode(tokens), self.answers[i]))

    # ------------------------------------------------------------------ streaming

    def start(self, rollout, version: int) -> bool:
        """Start the next evaluation asked for, if none runs, as one unit of the rollout:
        `version` is the one the engine holds now. Returns whether one started."""
        from asyncrl.generator.stream import EvalBatch

        if self.job is not None or not self.asked:
            return False
        self.job = _Job(self.asked.pop(0), version, self.clock(), len(self.prompts))
        rollout.start(self.episodes() if self.episodes is not None
                      else EvalBatch(self.prompts, self.max_tokens), version)
        if self.job.asked != version:
            log.warning("evaluating policy version %d (asked for %d)", version, self.job.asked)
        return True

    def collect(self, unit) -> EvalResult:
        """Score a finished EvalBatch: the result of the evaluation running."""
        job = self.job
        if job is None:
            raise RuntimeError("an evaluation finished with no evaluation running")
        versions = (unit.sampled_versions() if self.episodes is not None
                    else {v for seq in unit.seqs for v in seq.versions})
        if versions - {job.version}:
            raise RuntimeError(f"an evaluation of version {job.version} has tokens of "
                               f"versions {sorted(versions)}")
        if self.episodes is not None:
            job.total = sum(e.reward for e in unit.episodes)
        else:
            job.total = sum(self._score(i, seq.tokens) for i, seq in enumerate(unit.seqs))
        self.job = None
        n = len(self.prompts)
        return EvalResult(job.asked, job.version, job.total / max(1, n), n,
                          self.clock() - job.started)

    # ------------------------------------------------------------------ batch generation

    def run_blocking(self, engine, version: int) -> EvalResult | None:
        """The next evaluation asked for, as one blocking generate call (batch generation)."""
        if not self.asked:
            return None
        if self.episodes is not None:
            return self._episodes_blocking(engine, version)
        asked = self.asked.pop(0)
        t0 = self.clock()
        samples = engine.generate(self.prompts, 1, 0.0, self.max_tokens)
        total = sum(self._score(i, s[0].tokens) for i, s in enumerate(samples))
        n = len(self.prompts)
        return EvalResult(asked, version, total / max(1, n), n, self.clock() - t0)

    def _episodes_blocking(self, engine, version: int) -> EvalResult:
        """Multi-turn: the evaluation's episodes alone on the engine's request loop."""
        from asyncrl.generator.stream import Rollout

        rollout = Rollout(engine, len(self.prompts), "keep", self.clock)
        self.start(rollout, version)
        while True:
            rollout.step(version)
            done = rollout.take_finished()
            if done:
                return self.collect(done[0])
            if not rollout.running:
                time.sleep(0.005)  # only environment calls pending
