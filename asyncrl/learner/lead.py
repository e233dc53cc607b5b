"""Rank 0's extra duties in the learner, each called from the step loop of
asyncrl/learner/main.py in this order: whether a push is due (`push_due`; the push itself is
asyncrl/learner/whole.py's, through the weight sender, asyncrl/sync/sender.py), asking for an
owed evaluation (`evaluate`; asyncrl/learner/evals.py joins the answers by version), and the
step's row (`record`, then `write`: held until its evaluation is joined, then out through the
run's Monitor to RUN_DIR/metrics.jsonl; reward_<name> columns come from the reward parts each
completion carries). Also the checkpoint counters, and at the end the
plots and summary.json."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from asyncrl import lora, wire
from asyncrl.config import RunConfig
from asyncrl.jsonl import read_jsonl
from asyncrl.learner import checkpoint
from asyncrl.learner.batch import TrainBatch, token_staleness
from asyncrl.learner.evals import FileEvaluators, GeneratorEvaluators, RemoteEvals
from asyncrl.monitor import Monitor

log = logging.getLogger("asyncrl.learner")


def reward_parts(groups) -> dict[str, float]:
    """reward_<name>: the mean of each part of the reward (each task.rewards function
    unweighted, a reward model's score) over these completions, as the scorer that made the
    reward computed it, so the parts of a composite reward have curves of their own in
    metrics.jsonl (nothing when the reward has one part: it is reward_mean). Figures of
    episodes (`episode_turns`, `episode_tool_calls`, ...) are averaged under their own names,
    and `tool_success` is the share of tool calls answered without an error."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for g in groups:
        for c in g.completions:
            for name, value in (c.reward_parts or {}).items():
                sums[name] = sums.get(name, 0.0) + value
                counts[name] = counts.get(name, 0) + 1
    means = {k: v / counts[k] for k, v in sums.items()}
    figures = {k: v for k, v in means.items() if k.startswith("episode_")}
    rewards = {f"reward_{k}": v for k, v in means.items() if not k.startswith("episode_")}
    if sums.get("episode_tool_calls"):
        figures["tool_success"] = 1.0 - sums.get("episode_tool_errors", 0.0) / sums[
            "episode_tool_calls"]
    return {**(rewards if len(rewards) > 1 else {}), **figures}


class Lead:
    """Rank 0's extra duties: weight sync, asking for evaluations, metrics.jsonl, checkpoints,
    plot."""

    def __init__(self, cfg: RunConfig, run_dir: Path, m, out: Monitor,
                 ckpt: checkpoint.Checkpoint | None, replay_end: int = 0):
        from asyncrl import transport
        from asyncrl.sync.sender import WeightSender

        self.cfg, self.run_dir, self.m, self.out = cfg, run_dir, m, out
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
        self.push_owed = False  # a due push held back while an evaluation ran
        self.control = transport.Server(
            transport.context(), cfg.net.bind_host, cfg.net.sync_control_port,
            transport.keys_for(cfg.net, cfg.run_dir, "learner"),
            lambda port, reason: m.auth_failures.labels(str(port), reason).inc(),
            allow=(transport.GENERATORS,))
        self.sender = WeightSender(self.control, cfg.net.bind_host, cfg.net.sync_store_port,
                                   cfg.generator.num_generators, cfg.sync_backend,
                                   cfg.weight_sync.timeout_s, cfg.net.ready_timeout_s,
                                   rejected=m.messages_rejected,
                                   ranks_per_generator=cfg.generator.tensor_parallel_size,
                                   dtype=cfg.model.dtype,
                                   bucket_bytes=cfg.weight_sync.bucket_mb << 20,
                                   live_s=cfg.net.heartbeat_timeout_s,
                                   adapter=lora.wire_adapter(cfg.model.lora))
        self.sender.start()
        # A generator holds at most the newest version this learner will reach by replaying
        # (the last step logged before a restart) or has pushed (the sender raises it).
        self.sender.version_bound = replay_end
        # Resumed: generators started afresh hold version 0 and are brought up at once.
        self.sender.catch_up = ckpt is not None or replay_end > 0
        # generator.eval_engine: the evaluator answers, through RUN_DIR/evals/, and holds
        # no push back (asyncrl/generator/eval_engine.py); else the generators do.
        self.evaluators = (FileEvaluators(run_dir) if cfg.generator.eval_engine
                           else GeneratorEvaluators(self.sender))
        self.evals = RemoteEvals(self.evaluators, cfg.learner.eval_interval,
                                 cfg.learner.total_steps, cfg.weight_sync.timeout_s, out,
                                 m.eval_accuracy.set)
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
                    out.log(row, row["step"])
            self.evals.owed = True

    def push_due(self, due: bool) -> bool:
        """Whether to push now: a due push is held back while a generator evaluates (the load
        would wait for the evaluation to finish, its requests seeing one version, and the push
        for the load). The generators keep the older weights a little longer instead (bounded
        by buffer.max_staleness); the push goes out at the first sync after the answer. With
        generator.eval_engine nothing is held back: the evaluator is not in the broadcast."""
        self.sender.poll()  # an answer waiting clears the way now, not at the next push
        self.evals.poll()  # the answers, joined as they come, and those given up
        self.push_owed = self.push_owed or due
        return self.push_owed and not (self.evals.hold_pushes and self.evals.pending)

    def evaluate(self, step: int) -> None:
        """After the push of `step` (made or not): owe an evaluation if one is due, and ask
        for an owed one from whoever holds exactly this version."""
        self.evals.after_push(step)

    def record(self, step: int, batch: TrainBatch, stats: dict, waited: float,
               step_seconds: float, pushed: tuple[float, int] | None,
               groups: list[wire.TrajectoryGroup] = ()) -> dict:
        """The step's metrics.jsonl row (docs/metrics.md), and the push's Prometheus figures."""
        sync_s = sync_bytes = None
        if pushed is not None:
            sync_s, sync_bytes = pushed
            self.m.sync_seconds.observe(sync_s)
            self.m.sync_bytes.inc(sync_bytes)
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
               **reward_parts(groups),
               "tokens": batch.num_completion_tokens,
               "completions": batch.input_ids.shape[0],
               "tokens_per_s": self.tokens_total / max(elapsed, 1e-9),
               "step_s": step_seconds, "data_wait_s": waited, "sync_s": sync_s,
               "sync_bytes": sync_bytes, "elapsed_s": elapsed}
        if self.resumed_from is not None:
            row["resumed_from_step"], self.resumed_from = self.resumed_from, None
        return row

    def write(self, row: dict) -> None:
        """A row goes out through the Monitor once no evaluation at or before its version is
        outstanding (asyncrl/learner/evals.py); until then it waits here, a few steps."""
        self.evals.add_row(row)

    def counters(self, step: int) -> dict:
        return {"tokens_total": self.tokens_total, "samples_total": self.samples_total,
                "metrics_held": self.evals.held_upto(step)}

    def finish(self, sha256: str) -> None:
        from asyncrl.plots import length_percentiles, plot_episodes, plot_lengths, plot_run

        self.sender.shutdown(f"trained {self.cfg.learner.total_steps} steps")
        plot_run(self.metrics_path, self.run_dir / "curves.png")
        plot_episodes(self.metrics_path, self.run_dir / "episodes.png")
        plot_lengths(self.lengths, self.run_dir / "lengths.png")
        (self.run_dir / "summary.json").write_text(json.dumps(
            {"steps": self.cfg.learner.total_steps, "final_weights_sha256": sha256,
             "elapsed_s": time.time() - self.t_start,
             "completion_tokens": {**length_percentiles(self.lengths),
                                   "count": len(self.lengths)}}))
