"""A generator's control: weight sync with the learner and the evaluations it asks for.

`Control.serve` handles the learner's control messages (asyncrl/sync/member.py): a push is
loaded between two engine steps, the rollout told before and after (what happens to the
requests in flight, asyncrl/generator/stream.py), and each load is recorded (metrics, the
sync probe). An evaluation asked for runs on the version the engine holds: as one unit of the
rollout when streaming (`start_eval`, `finish_eval`), as one blocking generate call between
two calls in batch generation (`evaluate_blocking`); its answer goes back to the learner.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from asyncrl.generator.evaluate import EvalResult, Evaluator
from asyncrl.sync.member import InFlight, Served, SyncMember

log = logging.getLogger("asyncrl.generator")


class Control:
    def __init__(self, name: str, member: SyncMember, evaluator: Evaluator, probe: Probe, m,
                 stats):
        self.name, self.member, self.evaluator, self.probe = name, member, evaluator, probe
        self.m, self.stats = m, stats

    @property
    def version(self) -> int:
        """The policy version the engine holds."""
        return self.member.version

    def serve(self, timeout_s: float, inflight: InFlight | None = None) -> Served:
        served = self.member.serve(timeout_s, inflight)
        for version in served.asked:
            self.evaluator.ask(version)
        for x in served.loaded:
            self.m.policy_version.set(x.version)
            self.m.sync_seconds.observe(x.seconds)
            self.m.sync_bytes.inc(x.nbytes)
            self.stats.pushes, self.stats.sync_bytes = self.stats.pushes + 1, x.nbytes
            self.probe.record(x.version)
            log.info("%s: loaded policy version %d (%.2fs, %.1f MB)", self.name, x.version,
                     x.seconds, x.nbytes / 1e6)
        return served

    # ------------------------------------------------------------------ evaluations

    def start_eval(self, rollout) -> None:
        """Streaming: the next evaluation asked for, if none runs, among the training work."""
        self.evaluator.start(rollout, self.version)

    def finish_eval(self, unit) -> None:
        self._report(self.evaluator.collect(unit))

    def evaluate_blocking(self) -> None:
        """Batch generation: every evaluation asked for, one generate call each (nothing else
        is in flight)."""
        while self.evaluator.asked:
            self._report(self.evaluator.run_blocking(self.member.engine, self.version))

    def _report(self, r: EvalResult | None) -> None:
        if r is None:
            return
        self.member.report_eval(r.asked, r.version, r.accuracy, r.problems, r.seconds)
        self.m.eval_seconds.observe(r.seconds)
        self.stats.evals, self.stats.eval_s = self.stats.evals + 1, self.stats.eval_s + r.seconds
        log.info("%s: policy version %d: held-out accuracy %.1f%% (%d problems, %.2fs)",
                 self.name, r.version, 100 * r.accuracy, r.problems, r.seconds)


class Probe:
    """Records the engine's logprobs for a fixed prompt after every weight load, so the
    generator/learner mismatch can be checked against a checkpoint of the same version
    (RUN_DIR/sync_probe.jsonl)."""

    def __init__(self, engine, prompt: list[int], temperature: float, max_tokens: int,
                 path: Path, name: str, incarnation: str):
        self.engine, self.prompt, self.path = engine, prompt, path
        self.temperature, self.max_tokens = temperature, max_tokens
        self.name, self.incarnation = name, incarnation

    def record(self, version: int) -> None:
        s = self.engine.generate([self.prompt], 1, self.temperature, self.max_tokens,
                                 seed=0)[0][0]
        with self.path.open("a") as f:
            f.write(json.dumps({"generator": self.name, "incarnation": self.incarnation,
                                "policy_version": version,
                                "prompt_tokens": self.prompt, "tokens": s.tokens,
                                "logprobs": s.logprobs,
                                "temperature": self.temperature}) + "\n")
