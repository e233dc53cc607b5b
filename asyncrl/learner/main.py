"""Learner process (one per torchrun rank): pull batches, run off-policy GRPO, push weights.

Each step: ask the buffer for this rank's share of groups usable at the current policy version
(waiting while it has too few), recompute token logprobs with the transformers model, compute
group-relative advantages and the PPO-clipped loss against the generators' behaviour logprobs,
step the optimizer (DDP averages gradients when nproc > 1). The policy version is the number of
optimizer steps done. Rank 0 also evaluates held-out accuracy, writes RUN_DIR/metrics.jsonl,
checkpoints, and every sync.interval steps broadcasts the weights to the generators.

Left out here: proximal-policy recomputation, KL/entropy terms, other advantage estimators
(issue 3); resume from checkpoint under --max-restarts (issue 4).

Run (normally started by `asyncrl run`):
    torchrun --standalone --nproc-per-node 1 -m asyncrl.learner --config RUN_DIR/config.yaml
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from asyncrl import wire
from asyncrl.algo.advantages import grpo_advantages
from asyncrl.algo.losses import ppo_clip_loss
from asyncrl.config import RunConfig
from asyncrl.learner.batch import TrainBatch, collate
from asyncrl.learner.model import greedy_accuracy, load_policy, token_logprobs
from asyncrl.task import load_task

log = logging.getLogger("asyncrl.learner")


def run(cfg: RunConfig, run_dir: Path) -> None:
    import torch.distributed as dist
    from prometheus_client import CollectorRegistry

    from asyncrl import metrics, transport
    from asyncrl.sync.group import resolve_backend

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world != cfg.learner.nproc:
        raise RuntimeError(f"torchrun started {world} ranks but learner.nproc={cfg.learner.nproc}")
    torch.set_num_threads(cfg.learner.threads)
    torch.manual_seed(cfg.learner.seed)
    if world > 1:
        dist.init_process_group(resolve_backend(cfg.sync.backend))
    registry = CollectorRegistry()
    m = metrics.LearnerMetrics(registry)
    metrics.serve(registry, cfg.net.bind_host, cfg.net.learner_metrics_port(rank))

    model, tok = load_policy(cfg.model.path, cfg.model.dtype)
    model.train()
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learner.lr,
                            weight_decay=cfg.learner.weight_decay)
    warmup = max(1, cfg.learner.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    ctx = transport.context()
    buffer = transport.Client(ctx, cfg.net.buffer_host, cfg.net.buffer_learner_port,
                              f"learner{rank}")
    lead = _Lead(cfg, run_dir, model, tok, m) if rank == 0 else None

    for step in range(1, cfg.learner.total_steps + 1):
        t0 = time.perf_counter()
        groups, waited = _fetch(buffer, cfg, rank, version=step - 1)
        m.wait_seconds.inc(waited)
        batch = collate(groups, tok.pad_token_id)
        stats = _train_step(ddp, opt, batch, cfg)
        sched.step()
        m.steps.inc()
        m.policy_version.set(step)
        m.trained_tokens.inc(batch.num_completion_tokens)
        m.reward.set(stats["reward_mean"])
        m.loss.set(stats["pg_loss"])
        for s in (step - 1 - batch.versions).tolist():
            m.staleness.observe(s)
        step_seconds = time.perf_counter() - t0
        m.step_seconds.observe(step_seconds)
        if lead is not None:
            lead.after_step(step, batch, stats, waited, step_seconds)
    if lead is not None:
        lead.finish()
    if world > 1:
        dist.destroy_process_group()


def _fetch(buffer, cfg: RunConfig, rank: int, version: int) -> tuple[list, float]:
    """This rank's groups for a step at `version`, waiting until the buffer has enough."""
    t0 = time.perf_counter()
    req = wire.encode("batch_request", version, rank=rank, num_groups=cfg.groups_per_rank)
    last_reply = time.monotonic()
    while True:
        reply = buffer.request(req, timeout_s=5.0)
        if reply is None:
            if time.monotonic() - last_reply > cfg.net.ready_timeout_s:
                raise TimeoutError(
                    f"no reply from the buffer at {cfg.net.buffer_host}:"
                    f"{cfg.net.buffer_learner_port} for {cfg.net.ready_timeout_s:.0f}s "
                    "(net.buffer_host, net.ready_timeout_s)")
            continue
        last_reply = time.monotonic()
        msg = wire.decode(reply, expect=("batch", "error"))
        if msg["kind"] == "error":
            raise RuntimeError(f"buffer refused our batch request: {msg['reason']}")
        if msg["status"] == "ok":
            return msg["groups"], time.perf_counter() - t0
        time.sleep(0.02)


def _train_step(model, opt, batch: TrainBatch, cfg: RunConfig) -> dict[str, float]:
    lc = cfg.learner
    adv = grpo_advantages(batch.rewards, normalize_std=lc.normalize_adv_std)  # (G, N)
    adv = adv.reshape(-1, 1)  # (B, 1): one advantage for every token of a completion
    logprobs = token_logprobs(model, batch.input_ids, batch.attention_mask,
                              cfg.generator.temperature)  # (B, L-1)
    # Token-level mean (DAPO): every completion token weighs the same, long or short.
    normaliser = max(1.0, float(batch.completion_mask.sum()))
    loss, stats = ppo_clip_loss(logprobs, batch.behav_logprobs, adv, batch.completion_mask,
                                lc.clip_low, lc.clip_high, normaliser)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), lc.max_grad_norm)
    opt.step()
    stats["grad_norm"] = float(grad_norm)
    stats["reward_mean"] = float(batch.rewards.mean())
    return stats


class _Lead:
    """Rank 0's extra duties: weight sync, evaluation, metrics.jsonl, checkpoints, plot."""

    def __init__(self, cfg: RunConfig, run_dir: Path, model, tok, m):
        from asyncrl import transport
        from asyncrl.sync.sender import WeightSender

        self.cfg, self.run_dir, self.model, self.tok, self.m = cfg, run_dir, model, tok, m
        _, self.eval_set = load_task(cfg.task.name, cfg.task.digits, cfg.task.train_size,
                                     cfg.task.eval_size, cfg.task.seed)
        self.metrics_path = run_dir / "metrics.jsonl"
        self.t_start = time.time()
        self.tokens_total = 0
        self.control = transport.Server(transport.context(), cfg.net.bind_host,
                                        cfg.net.sync_control_port)
        self.sender = WeightSender(self.control, cfg.net.bind_host, cfg.net.sync_store_port,
                                   cfg.generator.num_generators, cfg.sync.backend,
                                   cfg.sync.timeout_s, cfg.net.ready_timeout_s)
        self.t_start = time.time()  # RL time starts once every generator is up
        self._write({"step": 0, "policy_version": 0, "reward_mean": None,
                     "staleness_mean": None, "eval_accuracy": self._evaluate(),
                     "elapsed_s": 0.0})

    def _evaluate(self) -> float:
        acc = greedy_accuracy(self.model, self.tok, self.eval_set, self.cfg.generator.max_tokens)
        self.m.eval_accuracy.set(acc)
        return acc

    def _write(self, row: dict) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def after_step(self, step: int, batch: TrainBatch, stats: dict, waited: float,
                   step_seconds: float) -> None:
        cfg = self.cfg
        last = step == cfg.learner.total_steps
        sync_s = None
        if step % cfg.sync.interval == 0 or last:
            sync_s, nbytes = self.sender.push(self.model, step)
            self.m.sync_seconds.observe(sync_s)
            self.m.sync_bytes.inc(nbytes)
        staleness = (step - 1 - batch.versions).float()
        self.tokens_total += batch.num_completion_tokens
        elapsed = time.time() - self.t_start
        row = {"step": step, "policy_version": step, "reward_mean": stats["reward_mean"],
               "staleness_mean": float(staleness.mean()), "staleness_max": int(staleness.max()),
               **{k: stats[k] for k in ("pg_loss", "clipfrac", "approx_kl", "ratio_mean",
                                        "grad_norm")},
               "tokens": batch.num_completion_tokens,
               "tokens_per_s": self.tokens_total / max(elapsed, 1e-9),
               "step_s": step_seconds, "data_wait_s": waited, "sync_s": sync_s,
               "elapsed_s": elapsed}
        if step % cfg.learner.eval_interval == 0 or last:
            row["eval_accuracy"] = self._evaluate()
        self._write(row)
        if step % cfg.learner.checkpoint_interval == 0 or last:
            self._checkpoint(step)

    def _checkpoint(self, step: int) -> None:
        out = self.run_dir / "checkpoints" / f"step_{step}"
        self.model.save_pretrained(out, safe_serialization=True)
        self.tok.save_pretrained(out)
        (out / "asyncrl_state.json").write_text(json.dumps({"step": step,
                                                            "policy_version": step}))

    def finish(self) -> None:
        from asyncrl.plots import plot_run

        plot_run(self.metrics_path, self.run_dir / "curves.png")
