"""Learner process (one per torchrun rank): pull batches, run off-policy GRPO, push weights.

Each step: ask the buffer for this rank's share of groups usable at the current policy version
(waiting while it has too few), recompute token logprobs with the transformers model, compute
group-relative advantages and the PPO-clipped loss against the generators' behaviour logprobs,
step the optimizer (when nproc > 1 the ranks share the model as learner.strategy says: DDP
copies, or FSDP2 shards, asyncrl/learner/shard.py). The policy version is the number of
optimizer steps done. Rank 0 also writes RUN_DIR/metrics.jsonl and checkpoints, every
sync.interval steps pushes the weights to the generators in buckets, and every
learner.eval_interval versions asks a generator to evaluate held-out accuracy, which it joins
into metrics.jsonl by version when the answer comes (asyncrl/learner/evals.py): training never
waits for it. Under fsdp every rank takes part in what needs the whole model (_Whole: gathers
for the push, the sharded checkpoints and hub-format exports, the final checksum).

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
from asyncrl.jsonl import read_jsonl
from asyncrl.learner import checkpoint, shard
from asyncrl.learner.batch import BatchRules, TrainBatch, collate, refusal
from asyncrl.learner.evals import RemoteEvals
from asyncrl.learner.model import check_packing, load_critic, load_policy
from asyncrl.learner.runlog import BatchLog, named_sha256, weights_sha256
from asyncrl.learner.step import Models, train_step, warmup_schedule
from asyncrl.rewards import combine
from asyncrl.sync import weights
from asyncrl.task import load_task

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
    their next collective while rank 0 pushes weights alone, which NCCL's
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
    sharded_ckpt = ckpt is not None and checkpoint.is_sharded(ckpt)
    # float32 master weights whatever model.dtype is (compute_context). A sharded checkpoint
    # is loaded into the model once it is sharded, over the starting weights.
    model, tok = load_policy(ckpt.path if ckpt is not None and not sharded_ckpt
                             else cfg.model.path, "float32", device.type)
    model.to(device).train()
    compute = compute_context(cfg.model.dtype, device)
    models = _build_models(cfg, model, device, world)
    sched = warmup_schedule(models.policy_opt, cfg.learner.warmup_steps)
    if sharded_ckpt:
        checkpoint.restore_sharded(ckpt, models, sched, rank)
    elif ckpt is not None:
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
    whole = _Whole(cfg, run_dir, models, tok, lead, rank, device)
    if lead is not None and not whole.every_rank:  # fsdp: _fetch(together=whole)
        source.while_waiting = lead.keep_in_sync

    for step in range(start + 1, cfg.learner.total_steps + 1):
        t0 = time.perf_counter()
        if step in batch_log.logged:  # taken from the buffer before a restart: train it again
            groups, dropped_total = batch_log.logged.pop(step)
            waited, filtered = 0.0, 0
        else:
            groups, waited, filtered, dropped_total = _fetch(
                source, cfg, rank, step - 1, whole if whole.every_rank else None)
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
        last = step == cfg.learner.total_steps
        pushed = whole.push(step, due=step % cfg.sync.interval == 0 or last)
        if lead is not None:
            lead.after_step(step, batch, stats, waited, step_seconds, pushed, groups)
        if step % cfg.learner.checkpoint_interval == 0 or last:
            whole.save_checkpoint(step, sched)
        if cfg.learner.strategy == "fsdp" and (last or (cfg.learner.export_interval
                                          and step % cfg.learner.export_interval == 0)):
            checkpoint.export(run_dir / "export" / ("final" if last else f"step_{step}"),
                              models.policy, tok, rank)
    whole.finish_evals(cfg.learner.total_steps)
    sha256 = whole.checksum()
    if lead is not None:
        lead.finish(sha256)
    if world > 1:
        dist.destroy_process_group()


def _build_models(cfg: RunConfig, model, device, world: int) -> Models:
    """The policy (DDP-wrapped or FSDP-sharded over the ranks, learner.strategy), its
    optimizer, and the reference model and critic when the algorithm needs them, shared out
    the same way. Under fsdp `model` itself is sharded in place, so build this before anything
    reads the whole model from it."""
    lc = cfg.learner

    def share(m):
        return shard.wrap(m, lc.strategy, world, cfg.model.dtype, lc.activation_checkpointing)

    policy = share(model)
    opt = torch.optim.AdamW(policy.parameters(), lr=lc.lr, weight_decay=lc.weight_decay)
    ref = critic = critic_opt = None
    if lc.kl_coef > 0:  # frozen: no master copy needed, it stays in model.dtype
        ref, _ = load_policy(cfg.model.path, cfg.model.dtype, device.type)
        ref.to(device).eval().requires_grad_(False)
        if lc.strategy == "fsdp" and world > 1:  # DDP has nothing to do for a frozen model
            ref = shard.wrap(ref, "fsdp", world, cfg.model.dtype)
    if lc.advantage == "gae":
        critic = share(load_critic(cfg.model.path, "float32", device.type).to(device).train())
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


def _fetch(source: _Source, cfg: RunConfig, rank: int, version: int,
           together: _Whole | None = None) -> tuple[list, float, int, int]:
    """This rank's groups for a step at `version`, waiting until the buffer has enough.
    With dynamic sampling, groups whose rewards are all equal are dropped (and counted) and
    fetching goes on until the batch is full.

    `together` (learner.strategy=fsdp): rank 0 cannot push weights while the others wait
    elsewhere, so every rank fetches in rounds, one request per round, and between rounds the
    ranks agree whether all have their batch and, if not, let rank 0 bring a generator that
    is behind up to date (_Whole.keep_in_sync), all of them gathering.
    Returns (groups, seconds waited, groups filtered, buffer's stale-dropped total)."""
    t0 = time.perf_counter()
    want = cfg.groups_per_rank
    kept: list = []
    dropped = dropped_total = 0
    while True:
        if len(kept) < want:
            got = _request(source, cfg, rank, version, want - len(kept),
                           once=together is not None)
            if got is not None:
                groups, dropped_total = got
                if cfg.learner.dynamic_sampling:
                    rewards = torch.tensor([[c.reward for c in g.completions] for g in groups])
                    keep = dynamic_sampling_mask(rewards).tolist()
                    dropped += keep.count(False)
                    groups = [g for g, k in zip(groups, keep) if k]
                kept += groups
        if together is None:
            if len(kept) >= want:
                break
            continue
        if shard.on_every_rank(len(kept) >= want, together.device):
            break
        together.keep_in_sync(version)
        time.sleep(0.02)
    return kept, time.perf_counter() - t0, dropped, dropped_total


def _request(source: _Source, cfg: RunConfig, rank: int, version: int, num_groups: int,
             once: bool = False) -> tuple[list, int] | None:
    """Ask until the buffer has num_groups groups (`once`: None after one answer without
    them). A reply that is not a usable batch is refused, counted and logged, and the request
    sent again: its groups are lost to training (the buffer handed them out), the step is
    not."""
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
            refused = (refusal(msg.groups, num_groups, source.rules)
                       if msg.kind == "batch" else None)
        if refused is not None:
            source.rejected.labels(refused[0]).inc()
            log.error("rank %d: refused a reply from the buffer (%s); asking again", rank,
                      refused[1])
        elif msg.kind == "error":
            raise RuntimeError(f"buffer refused our batch request: {msg.reason}")
        elif msg.status == "ok":
            return msg.groups, msg.stale_dropped_total
        if once:
            return None
        source.while_waiting(version)
        time.sleep(0.02)


class _Lead:
    """Rank 0's extra duties: weight sync, asking for evaluations, metrics.jsonl, checkpoints,
    plot."""

    def __init__(self, cfg: RunConfig, run_dir: Path, model, tok, m,
                 ckpt: checkpoint.Checkpoint | None):
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
        if ckpt is not None:
            resumed_t0 = time.time() - checkpoint.truncate_metrics(self.metrics_path, ckpt.step)
        self.resumed_from = ckpt.step if ckpt is not None else None
        self._last_keep = 0.0
        self.push_owed = False  # a due push held back while an evaluation ran
        self.control = transport.Server(
            transport.context(), cfg.net.bind_host, cfg.net.sync_control_port,
            transport.keys_for(cfg.net, cfg.run_dir),
            lambda port, reason: m.auth_failures.labels(str(port), reason).inc())
        self.sender = WeightSender(self.control, cfg.net.bind_host, cfg.net.sync_store_port,
                                   cfg.generator.num_generators, cfg.sync.backend,
                                   cfg.sync.timeout_s, cfg.net.ready_timeout_s,
                                   rejected=m.messages_rejected,
                                   ranks_per_generator=cfg.generator.tensor_parallel_size,
                                   dtype=cfg.model.dtype, bucket_bytes=cfg.sync.bucket_mb << 20)
        self.sender.start()
        self.evals = RemoteEvals(self.sender, cfg.learner.eval_interval, cfg.learner.total_steps,
                                 cfg.sync.timeout_s, self._write, m.eval_accuracy.set)
        # RL time starts once every generator is up (and goes on from before a restart).
        self.t_start = resumed_t0 if ckpt is not None else time.time()
        if ckpt is None:  # row 0: the SFT policy, evaluated by a generator like the others
            self.evals.after_push(0)
            self.evals.add_row({"step": 0, "policy_version": 0, "reward_mean": None,
                                "staleness_mean": None, "elapsed_s": 0.0})
        else:  # rows whose evaluation was in flight when the learner died: without it
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
        by buffer.max_staleness); the push goes out at the first sync after the answer."""
        self.sender.poll()  # an answer waiting clears the way now, not at the next sync
        self.evals.check()  # and so does an evaluation given up
        self.push_owed = self.push_owed or due
        return self.push_owed and not self.evals.pending

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


class _Whole:
    """What needs the whole model: weight pushes, checkpoints, the checksum. With
    learner.strategy=ddp rank 0 holds it and does these alone (the others skip them); with
    fsdp every rank takes part, gathering its shards, and rank 0 keeps the results."""

    def __init__(self, cfg: RunConfig, run_dir: Path, models: Models, tok, lead: _Lead | None,
                 rank: int, device: torch.device):
        self.cfg, self.run_dir, self.models, self.tok, self.lead = cfg, run_dir, models, tok, lead
        self.rank, self.device = rank, device
        self.every_rank = shard.is_sharded(models.policy)
        self._last_keep = 0.0

    def keep_in_sync(self, version: int) -> None:
        """Every rank, between fetch rounds (fsdp): _Lead.keep_in_sync, with every rank
        gathering. Rank 0 looks at most once a second; the others follow its answer."""
        now = time.monotonic()
        look = self.lead is not None and now - self._last_keep >= 1.0
        if look:
            self._last_keep = now
        pushed = self.push(version, due=False, look=look)
        if pushed is not None:
            self.lead.m.sync_seconds.observe(pushed[0])
            self.lead.m.sync_bytes.inc(pushed[1])
            log.info("pushed version %d to a generator that was behind while waiting for data",
                     version)

    def push(self, version: int, due: bool, look: bool = True) -> tuple[float, int] | None:
        """Push `version` if rank 0's sender says so (`look=False`: rank 0 does not even ask,
        but the others still learn that). Under fsdp a collective of every rank."""
        if not self.every_rank:
            return (self.lead.sync(shard.unwrap(self.models.policy), version, due)
                    if self.lead is not None else None)
        # Rank 0 decides; every rank gathers; a failed push is retried once, as in sync().
        sender = self.lead.sender if self.lead is not None else None
        due = self.lead.push_due(due) if self.lead is not None else False
        for attempt in (1, 2):
            wanted = sender is not None and look and sender.due(version, due)
            if not shard.from_rank0(wanted, self.device):
                return None
            tensors = shard.full_tensors(self.models.policy)
            pushed = None
            if sender is None:
                for _ in tensors:
                    pass
            else:
                specs = weights.specs_of(weights.sendable(shard.unwrap(self.models.policy)),
                                         sender.dtype)
                try:
                    pushed = sender.push(version, specs, tensors)
                except (RuntimeError, TimeoutError) as e:
                    if attempt == 2:
                        shard.from_rank0(False, self.device)
                        raise
                    log.warning("weight sync to version %d failed (%s); re-forming the group",
                                version, e)
            if shard.from_rank0(pushed is not None, self.device):
                if due and self.lead is not None:
                    self.lead.push_owed = False
                return pushed
        return None

    def finish_evals(self, version: int) -> None:
        """End of training: rank 0 waits (up to sync.timeout_s) for the evaluations still
        outstanding (RemoteEvals.finish), pushing the final version if it was held back; under
        fsdp the other ranks follow each round so that they gather with it for a push."""
        if not self.every_rank:
            if self.lead is not None:
                self.lead.evals.finish(version, lambda: self.lead.keep_in_sync(version),
                                       self.cfg.sync.timeout_s)
            return
        if self.lead is not None:
            def one_round() -> None:
                shard.from_rank0(True, self.device)  # the others: one more round
                self.keep_in_sync(version)

            self.lead.evals.finish(version, one_round, self.cfg.sync.timeout_s)
            shard.from_rank0(False, self.device)
        else:
            while shard.from_rank0(False, self.device):
                self.keep_in_sync(version)

    def save_checkpoint(self, step: int, sched) -> None:
        if self.cfg.learner.strategy == "fsdp":
            state = self.lead.counters(step) if self.lead is not None else {}
            checkpoint.save_sharded(self.run_dir, step, self.models, sched, state, self.rank)
        elif self.lead is not None:
            checkpoint.save(self.run_dir, step, shard.unwrap(self.models.policy), self.tok,
                            self.models, sched, self.lead.counters(step))

    def checksum(self) -> str | None:
        if self.every_rank:
            return named_sha256(shard.full_tensors(self.models.policy))
        return weights_sha256(shard.unwrap(self.models.policy)) if self.lead else None
