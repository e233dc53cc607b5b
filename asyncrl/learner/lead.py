"""Rank 0's extra duties in the learner: weight sync with the generators (asyncrl/sync/sender.py),
asking for evaluations and joining their answers by version (asyncrl/learner/evals.py), one
row per step in RUN_DIR/metrics.jsonl (with reward_<name>, each reward function's mean
rescored from the completions' text), the checkpoint counters, and at the end the plots and
summary.json."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from asyncrl import wire
from asyncrl.config import RunConfig
from asyncrl.jsonl import read_jsonl
from asyncrl.learner import checkpoint
from asyncrl.learner.batch import TrainBatch, token_staleness
from asyncrl.learner.evals import ExportedEvals, RemoteEvals
from asyncrl.rewards import combine
from asyncrl.task import load_task

log = logging.getLogger("asyncrl.learner")


def reward_parts(groups, answers: dict[int, str], rules, tok) -> dict[str, float]:
    """reward_<name>: the mean of each task.rewards function (unweighted) over these
    completions, rescored from their text as the generators decode it, so the parts of a
    composite reward (the format rewards) have curves of their own in metrics.jsonl."""
    sums = dict.fromkeys(rules.weights, 0.0)
    n = 0
    for g in groups:
        answer = answers.get(g.prompt_id)
        if answer is None:  # not a training problem of this task: nothing to rescore
            continue
        for c in g.completions:
            text = tok.decode(c.tokens.tolist(), skip_special_tokens=True)
            for name, value in rules.components(text, answer).items():
                sums[name] += value
            n += 1
    return {f"reward_{k}": v / n for k, v in sums.items()} if n else {}




class Lead:
    """Rank 0's extra duties: weight sync, asking for evaluations, metrics.jsonl, checkpoints,
    plot."""

    def __init__(self, cfg: RunConfig, run_dir: Path, model, tok, m,
                 ckpt: checkpoint.Checkpoint | None, replay_end: int = 0):
        from asyncrl import transport
        from asyncrl.sync.sender import WeightSender

        self.cfg, self.run_dir, self.model, self.tok, self.m = cfg, run_dir, model, tok, m
        train, _ = load_task(cfg.task)
        self.answers = {p.id: p.answer for p in train}  # reward_<name>: rescored per step
        self.rules = combine(cfg.task.rewards) if len(cfg.task.rewards) > 1 else None
        self.metrics_path = run_dir / "metrics.jsonl"
        state = ckpt.state if ckpt is not None else {}
        self.tokens_total = state.get("tokens_total", 0)
        self.samples_total = state.get("samples_total", 0)
        # Completion tokens of each sequence this process trained on (lengths.png, summary).
        self.lengths: list[int] = []
        # Rows after the checkpoint are recomputed by the replay: drop them, keep their time.
        # Without a checkpoint (a run stopped before its first) only row 0 stays, if written.
        restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
        resumed_t0 = time.time() - checkpoint.truncate_metrics(
            self.metrics_path, ckpt.step if ckpt is not None else 0, count_gap=restarted)
        self.resumed_from = ckpt.step if ckpt is not None else None
        self._last_keep = 0.0
        self.push_owed = False  # a due push held back while an evaluation ran
        self.control = transport.Server(
            transport.context(), cfg.net.bind_host, cfg.net.sync_control_port,
            transport.keys_for(cfg.net, cfg.run_dir, "learner"),
            lambda port, reason: m.auth_failures.labels(str(port), reason).inc(),
            allow=(transport.GENERATORS,))
        self.sender = WeightSender(self.control, cfg.net.bind_host, cfg.net.sync_store_port,
                                   cfg.generator.num_generators, cfg.sync.backend,
                                   cfg.sync.timeout_s, cfg.net.ready_timeout_s,
                                   rejected=m.messages_rejected,
                                   ranks_per_generator=cfg.generator.tensor_parallel_size,
                                   dtype=cfg.model.dtype, bucket_bytes=cfg.sync.bucket_mb << 20,
                                   live_s=cfg.net.heartbeat_timeout_s)
        self.sender.start()
        # A generator holds at most the newest version this learner will reach by replaying
        # (the last step logged before a restart) or has pushed (the sender raises it).
        self.sender.version_bound = replay_end
        # Resumed: generators started afresh hold version 0 and are brought up at once.
        self.sender.catch_up = ckpt is not None or replay_end > 0
        # generator.eval_engine: the evaluator answers, through RUN_DIR/evals/, and holds
        # no push back (asyncrl/generator/eval_engine.py).
        self.exported = ExportedEvals(run_dir) if cfg.generator.eval_engine else None
        self.evals = RemoteEvals(self.exported or self.sender, cfg.learner.eval_interval,
                                 cfg.learner.total_steps, cfg.sync.timeout_s, self._write,
                                 m.eval_accuracy.set, hold_pushes=self.exported is None)
        # RL time starts once every generator is up (and goes on from before a restart).
        self.t_start = resumed_t0
        if ckpt is None and not read_jsonl(self.metrics_path):
            # row 0: the SFT policy, evaluated by a generator like the others
            self.evals.after_push(0)
            self.evals.add_row({"step": 0, "policy_version": 0, "reward_mean": None,
                                "staleness_mean": None, "elapsed_s": 0.0})
        elif ckpt is not None:  # rows whose evaluation was in flight when the learner died
            written = {r["step"] for r in read_jsonl(self.metrics_path)}
            for row in state.get("metrics_held", []):
                if row["step"] not in written:
                    self._write(row)
            self.evals.owed = True

    def _write(self, row: dict) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def after_step(self, step: int, batch: TrainBatch, stats: dict, waited: float,
                   step_seconds: float, pushed: tuple[float, int] | None,
                   groups: list[wire.TrajectoryGroup] = ()) -> None:
        sync_s = None
        if pushed is not None:
            sync_s, nbytes = pushed
            self.m.sync_seconds.observe(sync_s)
            self.m.sync_bytes.inc(nbytes)
        hist = token_staleness(batch, step - 1)
        n_tok = max(1, sum(hist.values()))
        self.tokens_total += batch.num_completion_tokens
        self.samples_total += batch.input_ids.shape[0]
        self.lengths += batch.completion_mask.sum(dim=1).long().tolist()
        elapsed = time.time() - self.t_start
        row = {"step": step, "policy_version": step, "reward_mean": stats["reward_mean"],
               "staleness_mean": sum(k * v for k, v in hist.items()) / n_tok,
               "staleness_max": max(hist), "staleness_tokens": {str(k): v for k, v in hist.items()},
               "samples_trained": self.samples_total * self.cfg.learner_world,
               **{k: v for k, v in stats.items() if k != "reward_mean"},
               **(reward_parts(groups, self.answers, self.rules, self.tok)
                  if self.rules is not None else {}),
               "tokens": batch.num_completion_tokens,
               "tokens_per_s": self.tokens_total / max(elapsed, 1e-9),
               "step_s": step_seconds, "data_wait_s": waited, "sync_s": sync_s,
               "elapsed_s": elapsed}
        if self.resumed_from is not None:
            row["resumed_from_step"], self.resumed_from = self.resumed_from, None
        self.evals.after_push(step)
        self.evals.add_row(row)

    def keep_in_sync(self, version: int) -> None:
        """While this rank waits for data: a generator that restarted (a new incarnation, at
        version 0) samples data too stale to be trained on, so waiting for that data to step
        and sync would wait forever. At most once a second, re-form the session if it changed
        and bring any generator that is behind up to `version` (the weights as they are)."""
        now = time.monotonic()
        if now - self._last_keep < 1.0:
            return
        self._last_keep = now
        pushed = self.sync(self.model, version, due=False)
        if pushed is not None:
            self.m.sync_seconds.observe(pushed[0])
            self.m.sync_bytes.inc(pushed[1])
            log.info("pushed version %d to a generator that was behind while waiting for data",
                     version)

    def push_due(self, due: bool) -> bool:
        """Whether to push now: a due push is held back while a generator evaluates (the load
        would wait for the evaluation to finish, its requests seeing one version, and the push
        for the load). The generators keep the older weights a little longer instead (bounded
        by buffer.max_staleness); the push goes out at the first sync after the answer. With
        generator.eval_engine nothing is held back: the evaluator is not in the broadcast."""
        self.sender.poll()  # an answer waiting clears the way now, not at the next sync
        if self.exported is not None:
            self.exported.poll()  # the evaluator's answers, joined as they come
        self.evals.check()  # and so does an evaluation given up
        self.push_owed = self.push_owed or due
        return self.push_owed and not (self.evals.hold_pushes and self.evals.pending)

    def sync(self, model, version: int, due: bool) -> tuple[float, int] | None:
        """Rank 0 alone (ddp): weight sync, with a due push held back as push_due says."""
        due = self.push_due(due)
        pushed = self.sender.sync(model, version, due=due)
        if due:
            self.push_owed = False
        return pushed

    def counters(self, step: int) -> dict:
        return {"tokens_total": self.tokens_total, "samples_total": self.samples_total,
                "metrics_held": self.evals.held_upto(step)}

    def finish(self, sha256: str) -> None:
        from asyncrl.plots import length_percentiles, plot_lengths, plot_run

        self.sender.shutdown(f"trained {self.cfg.learner.total_steps} steps")
        plot_run(self.metrics_path, self.run_dir / "curves.png")
        plot_lengths(self.lengths, self.run_dir / "lengths.png")
        (self.run_dir / "summary.json").write_text(json.dumps(
            {"steps": self.cfg.learner.total_steps, "final_weights_sha256": sha256,
             "elapsed_s": time.time() - self.t_start,
             "completion_tokens": {**length_percentiles(self.lengths),
                                   "count": len(self.lengths)}}))
