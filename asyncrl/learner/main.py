"""Learner process (one per torchrun rank): pull batches, run off-policy GRPO, push weights.

Each step: ask the buffer for this rank's share of groups usable at the current policy version
(waiting while it has too few), recompute token logprobs with the transformers model, compute
group-relative advantages and the PPO-clipped loss against the generators' behaviour logprobs,
step the optimizer (DDP averages gradients when nproc > 1). The policy version is the number of
optimizer steps done. Rank 0 also evaluates held-out accuracy, writes RUN_DIR/metrics.jsonl,
checkpoints, and every sync.interval steps broadcasts the weights to the generators.

The algorithm (advantage estimator, off-policy correction, KL, entropy, critic, DAPO's
dynamic sampling and overlong shaping) is chosen in config; asyncrl/learner/step.py applies it.

Restarts: under torchrun --max-restarts every rank resumes from the newest checkpoint and
replays the steps after it from its batch log (asyncrl/learner/checkpoint.py); rank 0 forms a
new weight-sync session with the generators (asyncrl/sync/sender.py).

Run (normally started by `asyncrl run`):
    torchrun --standalone --nproc-per-node 1 -m asyncrl.learner --config RUN_DIR/config.yaml
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from asyncrl import wire
from asyncrl.algo.sampling import dynamic_sampling_mask
from asyncrl.config import RunConfig
from asyncrl.learner import checkpoint
from asyncrl.learner.batch import BatchRules, TrainBatch, collate, refusal
from asyncrl.learner.model import check_packing, greedy_accuracy, load_critic, load_policy
from asyncrl.learner.runlog import BatchLog, weights_sha256
from asyncrl.learner.step import Models, train_step, warmup_schedule
from asyncrl.rewards import REWARD_FUNCTIONS, combine
from asyncrl.task import chat_context, load_task

if TYPE_CHECKING:
    from prometheus_client import Counter

    from asyncrl import transport

log = logging.getLogger("asyncrl.learner")


def init_ranks(backend: str, timeout_s: float = 1800.0) -> None:
    """Join the process group of this torchrun attempt.

    torchrun's workers use the agent's TCPStore, and that store outlives a restart. The keys
    init_process_group writes carry no attempt number. A restarted rank can therefore read the
    dead attempt's gloo or NCCL addresses, then fail with "connection refused" or wait. Seen on
    CI: it used up every restart and then hung. Each attempt gets its own key prefix.

    The group's timeout is explicit (learner.collective_timeout_s): the other ranks wait in
    their next collective while rank 0 evaluates and pushes weights alone, which NCCL's
    10-minute default would cut short on a large model.
    """
    from datetime import timedelta

    import torch.distributed as dist

    store, rank, world = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"asyncrl/attempt{attempt}", store),
                            rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))


def compute_context(dtype: str, device: torch.device):
    """Mixed precision: the learner keeps float32 master weights and optimizer state, and runs
    its forward passes under autocast to model.dtype (bf16/fp16), whose gradients land in
    float32. Training bf16 weights directly drops most small AdamW updates (below bf16's
    resolution: at lr 1e-6, 50 steps changed 1.8% of the values)."""
    import contextlib

    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def run(cfg: RunConfig, run_dir: Path) -> None:
    import torch.distributed as dist
    from prometheus_client import CollectorRegistry

    from asyncrl import metrics, transport
    from asyncrl.sync.group import resolve_backend

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world != cfg.learner_world:
        raise RuntimeError(f"torchrun started {world} ranks but learner.nproc x learner.nnodes="
                           f"{cfg.learner_world}")
    torch.set_num_threads(cfg.learner.threads)
    torch.manual_seed(cfg.learner.seed)
    # The device follows the backend: NCCL needs the weights on the GPU it broadcasts from,
    # and a colocated (ipc) learner shares its GPU with the engine.
    backend = resolve_backend(cfg.sync.backend)
    device = (torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
              if backend in ("nccl", "ipc") else torch.device("cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        init_ranks("nccl" if device.type == "cuda" else "gloo", cfg.learner.collective_timeout_s)
    registry = CollectorRegistry()
    m = metrics.LearnerMetrics(registry)
    metrics.serve(registry, cfg.net.bind_host, cfg.net.learner_metrics_port(rank))

    ckpt = checkpoint.latest(run_dir)
    start = ckpt.step if ckpt is not None else 0
    # float32 master weights whatever model.dtype is (compute_context).
    model, tok = load_policy(ckpt.path if ckpt is not None else cfg.model.path, "float32",
                             device.type)
    model.to(device).train()
    compute = compute_context(cfg.model.dtype, device)
    models = _build_models(cfg, model, device, world)
    sched = warmup_schedule(models.policy_opt, cfg.learner.warmup_steps)
    if ckpt is not None:
        checkpoint.restore(ckpt, models, sched)
    batch_log = BatchLog(run_dir, rank, start)
    if ckpt is not None:
        log.info("resumed from %s (restart %s): replaying %d logged steps, then step %d on",
                 ckpt.path, os.environ.get("TORCHELASTIC_RESTART_COUNT", "?"),
                 len(batch_log.logged), start + len(batch_log.logged) + 1)
    ctx = transport.context()
    keys = transport.keys_for(cfg.net, cfg.run_dir)
    buffer = transport.Client(ctx, cfg.net.buffer_host, cfg.net.buffer_learner_port,
                              f"learner{rank}", keys)
    rules = BatchRules(cfg.generator.group_size, cfg.generator.max_tokens,
                       getattr(model.config, "max_position_embeddings", None))
    source = _Source(buffer, rules, model.get_input_embeddings().num_embeddings,
                     m.messages_rejected)
    transport.Heartbeat(cfg.net.buffer_host, cfg.net.heartbeat_port,
                        lambda: wire.encode("heartbeat", 0, sender=f"learner{rank}",
                                            role="learner"),
                        cfg.net.heartbeat_interval_s, keys).start()
    lead = _Lead(cfg, run_dir, model, tok, m, ckpt) if rank == 0 else None
    if lead is not None:
        source.while_waiting = lead.keep_in_sync

    for step in range(start + 1, cfg.learner.total_steps + 1):
        t0 = time.perf_counter()
        if step in batch_log.logged:  # taken from the buffer before a restart: train it again
            groups, dropped_total = batch_log.logged.pop(step)
            waited, filtered = 0.0, 0
        else:
            groups, waited, filtered, dropped_total = _fetch(source, cfg, rank, step - 1)
            batch_log.append(step, groups, dropped_total)
        batch = collate(groups, tok.pad_token_id).to(device)
        if step == start + 1 and cfg.learner.pack_row_tokens > 0:
            with compute:
                worst = check_packing(model, batch.input_ids, batch.attention_mask,
                                      batch.completion_mask, cfg.learner.pack_row_tokens,
                                      1e-2 if cfg.model.dtype == "float32" else 0.25)
            log.info("packed rows of %d tokens: logprobs within %.2g of padded ones",
                     cfg.learner.pack_row_tokens, worst)
        with compute:
            stats = train_step(models, batch, cfg.learner, cfg.generator.temperature,
                               cfg.generator.max_tokens)
        sched.step()
        stats.update(dynamic_sampling_filtered_groups=filtered, stale_dropped_total=dropped_total)
        step_seconds = time.perf_counter() - t0
        m.record_step(step, stats, batch.num_completion_tokens,
                      token_staleness(batch, step - 1), waited, step_seconds)
        if lead is not None:
            lead.after_step(step, batch, stats, waited, step_seconds, groups)
            if step % cfg.learner.checkpoint_interval == 0 or step == cfg.learner.total_steps:
                lead.save_checkpoint(step, models, sched)
    if lead is not None:
        lead.finish()
    if world > 1:
        dist.destroy_process_group()


def _build_models(cfg: RunConfig, model, device, world: int) -> Models:
    lc = cfg.learner
    policy = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=lc.lr, weight_decay=lc.weight_decay)
    ref = critic = critic_opt = None
    if lc.kl_coef > 0:  # frozen: no master copy needed, it stays in model.dtype
        ref, _ = load_policy(cfg.model.path, cfg.model.dtype, device.type)
        ref.to(device).eval().requires_grad_(False)
    if lc.advantage == "gae":
        critic = load_critic(cfg.model.path, "float32", device.type).to(device).train()
        if world > 1:
            critic = torch.nn.parallel.DistributedDataParallel(critic)
        critic_opt = torch.optim.AdamW(critic.parameters(), lr=lc.critic_lr)
    return Models(policy, opt, ref, critic, critic_opt)


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


def token_staleness(batch: TrainBatch, version: int) -> dict[int, int]:
    """Completion tokens per staleness (policy versions between sampling and this update)."""
    lags = version - batch.versions[batch.completion_mask.bool()]  # one per completion token
    values, counts = torch.unique(lags, return_counts=True)
    return {int(v): int(n) for v, n in zip(values.tolist(), counts.tolist())}


@dataclass
class _Source:
    """Where a rank's batches come from and what it accepts from there."""

    buffer: transport.Client
    rules: BatchRules
    vocab_size: int
    rejected: Counter  # LearnerMetrics.messages_rejected, by reason
    # Rank 0, while the buffer has too little: keep weight sync going (see _Lead.keep_in_sync).
    while_waiting: Callable[[int], None] = lambda version: None


def _fetch(source: _Source, cfg: RunConfig, rank: int, version: int
           ) -> tuple[list, float, int, int]:
    """This rank's groups for a step at `version`, waiting until the buffer has enough.
    With dynamic sampling, groups whose rewards are all equal are dropped (and counted) and
    fetching goes on until the batch is full.
    Returns (groups, seconds waited, groups filtered, buffer's stale-dropped total)."""
    t0 = time.perf_counter()
    want = cfg.groups_per_rank
    kept: list = []
    dropped = 0
    while len(kept) < want:
        groups, dropped_total = _request(source, cfg, rank, version, want - len(kept))
        if cfg.learner.dynamic_sampling:
            rewards = torch.tensor([[c.reward for c in g.completions] for g in groups])
            keep = dynamic_sampling_mask(rewards).tolist()
            dropped += keep.count(False)
            groups = [g for g, k in zip(groups, keep) if k]
        kept += groups
    return kept, time.perf_counter() - t0, dropped, dropped_total


def _request(source: _Source, cfg: RunConfig, rank: int, version: int, num_groups: int
             ) -> tuple[list, int]:
    """Ask until the buffer has num_groups groups. A reply that is not a usable batch is
    refused, counted and logged, and the request sent again: its groups are lost to training
    (the buffer handed them out), the step is not."""
    req = wire.encode("batch_request", version, rank=rank, num_groups=num_groups)
    last_reply = time.monotonic()
    while True:
        reply = source.buffer.request(req, timeout_s=5.0)
        if reply is None:
            if time.monotonic() - last_reply > cfg.net.ready_timeout_s:
                raise TimeoutError(
                    f"no reply from the buffer at {cfg.net.buffer_host}:"
                    f"{cfg.net.buffer_learner_port} for {cfg.net.ready_timeout_s:.0f}s "
                    "(net.buffer_host, net.ready_timeout_s)")
            continue
        last_reply = time.monotonic()
        try:
            msg = wire.decode(reply, expect=("batch", "error"), vocab_size=source.vocab_size)
        except wire.MessageError as e:
            msg, refused = None, (e.reason, str(e))
        else:
            refused = (refusal(msg["groups"], num_groups, source.rules)
                       if msg["kind"] == "batch" else None)
        if refused is not None:
            source.rejected.labels(refused[0]).inc()
            log.error("rank %d: refused a reply from the buffer (%s); asking again", rank,
                      refused[1])
        elif msg["kind"] == "error":
            raise RuntimeError(f"buffer refused our batch request: {msg['reason']}")
        elif msg["status"] == "ok":
            return msg["groups"], msg["stale_dropped_total"]
        source.while_waiting(version)
        time.sleep(0.02)


class _Lead:
    """Rank 0's extra duties: weight sync, evaluation, metrics.jsonl, checkpoints, plot."""

    def __init__(self, cfg: RunConfig, run_dir: Path, model, tok, m,
                 ckpt: checkpoint.Checkpoint | None):
        from asyncrl import transport
        from asyncrl.sync.sender import WeightSender

        self.cfg, self.run_dir, self.model, self.tok, self.m = cfg, run_dir, model, tok, m
        train, self.eval_set = load_task(cfg.task)
        self.answers = {p.id: p.answer for p in train}
        self.rules = combine(cfg.task.rewards) if len(cfg.task.rewards) > 1 else None
        self.metrics_path = run_dir / "metrics.jsonl"
        state = ckpt.state if ckpt is not None else {}
        self.tokens_total = state.get("tokens_total", 0)
        self.samples_total = state.get("samples_total", 0)
        # Completion tokens of each sequence this process trained on (lengths.png, summary).
        self.lengths: list[int] = []
        # Rows after the checkpoint are recomputed by the replay: drop them, keep their time.
        if ckpt is not None:
            resumed_t0 = time.time() - checkpoint.truncate_metrics(self.metrics_path, ckpt.step)
        self.resumed_from = ckpt.step if ckpt is not None else None
        self._last_keep = 0.0
        self.control = transport.Server(
            transport.context(), cfg.net.bind_host, cfg.net.sync_control_port,
            transport.keys_for(cfg.net, cfg.run_dir),
            lambda port, reason: m.auth_failures.labels(str(port), reason).inc())
        self.sender = WeightSender(self.control, cfg.net.bind_host, cfg.net.sync_store_port,
                                   cfg.generator.num_generators, cfg.sync.backend,
                                   cfg.sync.timeout_s, cfg.net.ready_timeout_s,
                                   rejected=m.messages_rejected,
                                   ranks_per_generator=cfg.generator.tensor_parallel_size,
                                   dtype=cfg.model.dtype)
        self.sender.start()
        # RL time starts once every generator is up (and goes on from before a restart).
        self.t_start = resumed_t0 if ckpt is not None else time.time()
        if ckpt is None:
            self._write({"step": 0, "policy_version": 0, "reward_mean": None,
                         "staleness_mean": None, "eval_accuracy": self._evaluate(),
                         "elapsed_s": 0.0})

    def _evaluate(self) -> float:
        device = next(self.model.parameters()).device
        with compute_context(self.cfg.model.dtype, device):
            acc = greedy_accuracy(self.model, self.tok, self.eval_set,
                                  self.cfg.generator.max_tokens,
                                  REWARD_FUNCTIONS[self.cfg.task.eval_reward],
                                  self.cfg.task.chat_template,
                                  context=chat_context(self.cfg.task))
        self.m.eval_accuracy.set(acc)
        return acc

    def _write(self, row: dict) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def after_step(self, step: int, batch: TrainBatch, stats: dict, waited: float,
                   step_seconds: float, groups: list[wire.TrajectoryGroup] = ()) -> None:
        cfg = self.cfg
        last = step == cfg.learner.total_steps
        sync_s = None
        pushed = self.sender.sync(self.model, step, due=step % cfg.sync.interval == 0 or last)
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
        if step % cfg.learner.eval_interval == 0 or last:
            row["eval_accuracy"] = self._evaluate()
        self._write(row)

    def keep_in_sync(self, version: int) -> None:
        """While this rank waits for data: a generator that restarted (a new incarnation, at
        version 0) samples data too stale to be trained on, so waiting for that data to step
        and sync would wait forever. At most once a second, re-form the session if it changed
        and bring any generator that is behind up to `version` (the weights as they are)."""
        now = time.monotonic()
        if now - self._last_keep < 1.0:
            return
        self._last_keep = now
        pushed = self.sender.sync(self.model, version, due=False)
        if pushed is not None:
            self.m.sync_seconds.observe(pushed[0])
            self.m.sync_bytes.inc(pushed[1])
            log.info("pushed version %d to a generator that was behind while waiting for data",
                     version)

    def save_checkpoint(self, step: int, models: Models, sched) -> None:
        checkpoint.save(self.run_dir, step, self.model, self.tok, models, sched,
                        {"tokens_total": self.tokens_total, "samples_total": self.samples_total})

    def finish(self) -> None:
        from asyncrl.plots import length_percentiles, plot_lengths, plot_run

        self.sender.shutdown(f"trained {self.cfg.learner.total_steps} steps")
        plot_run(self.metrics_path, self.run_dir / "curves.png")
        plot_lengths(self.lengths, self.run_dir / "lengths.png")
        (self.run_dir / "summary.json").write_text(json.dumps(
            {"steps": self.cfg.learner.total_steps, "final_weights_sha256":
             weights_sha256(self.model), "elapsed_s": time.time() - self.t_start,
             "completion_tokens": {**length_percentiles(self.lengths),
                                   "count": len(self.lengths)}}))
