"""Learner process (one per torchrun rank): pull batches, run off-policy GRPO, push weights.

Each step: ask the buffer for this rank's share of groups usable at the current policy version
(waiting while it has too few), recompute token logprobs with the transformers model, compute
group-relative advantages and the PPO-clipped loss against the generators' behaviour logprobs,
step the optimizer (when nproc > 1 the ranks share the model as learner.strategy says: DDP
copies, or FSDP2 shards, asyncrl/learner/shard.py). The policy version is the number of
optimizer steps done. After each step, in this order: the weights are pushed to the
generators every weight_sync.interval steps (asyncrl/learner/whole.py), an evaluation of held-out
accuracy is asked for every learner.eval_interval versions (asyncrl/learner/evals.py joins the
answer by version when it comes: training never waits for it), and the step's row is written
to RUN_DIR/metrics.jsonl through the run's Monitor (asyncrl/monitor.py) once its evaluation is
joined; then checkpoints. Rank 0 does these (asyncrl/learner/lead.py); under fsdp every rank
takes part in what needs the whole model (asyncrl/learner/whole.py: gathers for the push, the
sharded checkpoints and hub-format exports, the final checksum).

The algorithm (advantage estimator, off-policy correction, KL, entropy, critic, DAPO's
dynamic sampling and overlong shaping) is chosen in config; asyncrl/learner/step.py applies it.

Restarts: under torchrun --max-restarts every rank resumes from the newest checkpoint and
replays the steps after it from its batch log (asyncrl/learner/checkpoint.py); rank 0 forms a
new weight-sync session with the generators (asyncrl/sync/sender.py).

Run (normally started by `asyncrl run`):
    torchrun --standalone --nproc-per-node 1 -m asyncrl.learner --config RUN_DIR/config.yaml
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from asyncrl import lora, wire
from asyncrl.algo.sampling import dynamic_sampling_mask
from asyncrl.config import RunConfig
from asyncrl.learner import checkpoint, evals, shard
from asyncrl.learner.batch import BatchRules, collate, refusal, token_staleness
from asyncrl.learner.lead import Lead
from asyncrl.learner.model import check_packing, load_critic, load_policy
from asyncrl.learner.runlog import BatchLog
from asyncrl.learner.step import Models, train_step, warmup_schedule
from asyncrl.learner.whole import Whole

if TYPE_CHECKING:
    from prometheus_client import Counter

    from asyncrl import transport

log = logging.getLogger("asyncrl.learner")


def init_ranks(backend: str, timeout_s: float = 1800.0) -> None:
    """Join the process group of this torchrun attempt.

    torchrun's workers use the agent's TCPStore, and that store outlives a restart. The keys
    init_process_group writes carry no attempt number. A restarted rank can therefore read the
    dead attempt's gloo or NCCL addresses, then fail with "connection refused" or wait until
    every restart is used up. Each attempt gets its own key prefix.

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

    from asyncrl.monitor import JsonlMonitor

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = _device(cfg, world)
    m = _metrics(cfg, rank)
    ckpt = checkpoint.latest(run_dir)
    start = ckpt.step if ckpt is not None else 0
    model, tok, models, sched = _restore(cfg, ckpt, device, world, rank)
    batch_log = BatchLog(run_dir, rank, start)
    if ckpt is not None:
        log.info("resumed from %s (restart %s): replaying %d logged steps, then step %d on",
                 ckpt.path, os.environ.get("TORCHELASTIC_RESTART_COUNT", "?"),
                 len(batch_log.logged), start + len(batch_log.logged) + 1)
    source = _connect(cfg, rank, model, m)
    replay_end = max(batch_log.logged, default=start)
    lead = (Lead(cfg, run_dir, m, JsonlMonitor(run_dir / "metrics.jsonl"), ckpt, replay_end)
            if rank == 0 else None)
    whole = Whole(cfg, run_dir, models, tok, lead, rank, device)
    compute = compute_context(cfg.model.dtype, device)

    for step in range(start + 1, cfg.learner.total_steps + 1):
        t0 = time.perf_counter()
        groups, waited, filtered, dropped_total = _take(step, batch_log, source, cfg, rank,
                                                        whole)
        batch = collate(groups, tok.pad_token_id).to(device)
        if step == start + 1:
            _check_packing(cfg, model, batch, compute)
        with compute:
            stats = train_step(models, batch, cfg.learner, cfg.generator.temperature,
                               cfg.max_completion_tokens)
        sched.step()
        stats.update(dynamic_sampling_filtered_groups=filtered, stale_dropped_total=dropped_total)
        step_seconds = time.perf_counter() - t0
        m.record_step(step, stats, batch.num_completion_tokens,
                      token_staleness(batch, step - 1), waited, step_seconds)
        last = step == cfg.learner.total_steps
        # After the step, in this order: push, evaluate, write (rank 0's duties: lead.py).
        pushed = whole.push(step, due=step % cfg.weight_sync.interval == 0 or last)
        if cfg.generator.eval_engine and evals.due(step, cfg.learner.eval_interval,
                                                   cfg.learner.total_steps):
            whole.export_for_eval(step)  # the evaluator's copy, before it is asked for
        if lead is not None:
            lead.evaluate(step)
            lead.write(lead.record(step, batch, stats, waited, step_seconds, pushed, groups))
        if step % cfg.learner.checkpoint_interval == 0 or last:
            whole.save_checkpoint(step, sched)
        _export(cfg, run_dir, models, tok, rank, step, last)
    whole.finish_evals(cfg.learner.total_steps)
    sha256 = whole.checksum()
    if lead is not None:
        lead.finish(sha256)
    if world > 1:
        dist.destroy_process_group()


def _take(step: int, batch_log: BatchLog, source: _Source, cfg: RunConfig, rank: int,
          whole: Whole) -> tuple[list, float, int, int]:
    """The step's groups: from the batch log when the step is replayed after a restart, else
    from the buffer, logged before anything trains on them."""
    if step in batch_log.logged:
        groups, dropped_total = batch_log.logged.pop(step)
        return groups, 0.0, 0, dropped_total
    with source.stop.holding():  # a stop signal waits until the batch is logged
        groups, waited, filtered, dropped_total = _fetch(source, cfg, rank, step - 1, whole)
        batch_log.append(step, groups, dropped_total)
    return groups, waited, filtered, dropped_total


def _export(cfg: RunConfig, run_dir: Path, models, tok, rank: int, step: int,
            last: bool) -> None:
    """Under fsdp (sharded checkpoints) the hub-format weights every
    learner.export_interval steps and at the end; with model.lora the peft-format adapter
    (whatever the strategy), and at the end the merged weights when
    model.lora.export_merged."""
    interval = cfg.learner.export_interval
    adapters = cfg.model.lora.rank > 0
    if ((cfg.learner.strategy == "fsdp" or adapters)
            and (last or (interval and step % interval == 0))):
        checkpoint.export(run_dir / "export" / ("final" if last else f"step_{step}"),
                          models.policy, tok, rank)
    if adapters and last and cfg.model.lora.export_merged:
        checkpoint.export(run_dir / "export" / "final-merged", models.policy, tok, rank,
                          merged=True)


def _device(cfg: RunConfig, world: int) -> torch.device:
    """The device follows the backend: NCCL needs the weights on the GPU it broadcasts from,
    and a colocated (ipc) learner shares its GPU with the engine. Joins the ranks' group."""
    from asyncrl.sync.group import resolve_backend

    if world != cfg.learner_world:
        raise RuntimeError(f"torchrun started {world} ranks but learner.nproc x learner.nnodes="
                           f"{cfg.learner_world}")
    torch.set_num_threads(cfg.learner.threads)
    torch.manual_seed(cfg.learner.seed)

    backend = resolve_backend(cfg.weight_sync.backend)
    device = (torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
              if backend in ("nccl", "ipc") else torch.device("cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        init_ranks("nccl" if device.type == "cuda" else "gloo", cfg.learner.collective_timeout_s)
    return device


def _metrics(cfg: RunConfig, rank: int):
    from prometheus_client import CollectorRegistry

    from asyncrl import metrics

    registry = CollectorRegistry()
    m = metrics.LearnerMetrics(registry)
    metrics.serve(registry, cfg.net.bind_host, cfg.net.learner_metrics_port(rank))
    return m


def _restore(cfg: RunConfig, ckpt, device: torch.device, world: int, rank: int):
    """The policy (float32 master weights whatever model.dtype is: compute_context), its
    tokenizer, the models and optimizers the algorithm needs, and the LR schedule, from the
    newest checkpoint if there is one. A sharded checkpoint is loaded into the model once it
    is sharded, over the starting weights."""
    sharded_ckpt = ckpt is not None and checkpoint.is_sharded(ckpt)
    adapters = cfg.model.lora.rank > 0  # a checkpoint then holds the adapter, not weights
    whole_ckpt = ckpt is not None and not sharded_ckpt and not adapters
    model, tok = build_policy(cfg, ckpt.path if whole_ckpt else cfg.model.path, "float32",
                              device.type)
    if adapters and ckpt is not None and not sharded_ckpt:
        lora.load_adapter(model, ckpt.path)
    model.to(device).train()
    models = _build_models(cfg, model, device, world)
    sched = warmup_schedule(models.policy_opt, cfg.learner.warmup_steps,
                            cfg.learner.total_steps if cfg.learner.lr_anneal else 0)
    if sharded_ckpt:
        checkpoint.restore_sharded(ckpt, models, sched, rank)
    elif ckpt is not None:
        checkpoint.restore(ckpt, models, sched)
    return model, tok, models, sched


def build_policy(cfg: RunConfig, path, dtype: str = "float32", device_type: str = "cpu"):
    """(policy, tokenizer) from `path`, with model.lora's adapters on it when configured
    (fresh: B = 0, so it starts as the base)."""
    model, tok = load_policy(path, dtype, device_type)
    lo = cfg.model.lora
    if lo.rank:
        lora.apply(model, lo.rank, lo.alpha, lo.dropout, lo.target_modules)
    return model, tok


def _connect(cfg: RunConfig, rank: int, model, m) -> _Source:
    """The buffer client this rank fetches from, and its heartbeat to the buffer."""
    from asyncrl import transport

    keys = transport.keys_for(cfg.net, cfg.run_dir, "learner")
    buffer = transport.Client(transport.context(), cfg.net.buffer_host,
                              cfg.net.buffer_learner_port, f"learner{rank}", keys)
    transport.Heartbeat(cfg.net.buffer_host, cfg.net.heartbeat_port,
                        lambda: wire.encode("heartbeat", 0, sender=f"learner{rank}",
                                            role="learner"),
                        cfg.net.heartbeat_interval_s, keys).start()
    rules = BatchRules(cfg.generator.group_size, cfg.max_completion_tokens,
                       getattr(model.config, "max_position_embeddings", None))
    return _Source(buffer, rules, model.get_input_embeddings().num_embeddings,
                   m.messages_rejected, _Stop())


def _check_packing(cfg: RunConfig, model, batch, compute) -> None:
    """learner.pack_row_tokens: the first batch's logprobs packed equal the padded ones."""
    if cfg.learner.pack_row_tokens <= 0:
        return
    with compute:
        worst = check_packing(model, batch.input_ids, batch.attention_mask,
                              batch.completion_mask, cfg.learner.pack_row_tokens,
                              1e-2 if cfg.model.dtype == "float32" else 0.25)
    log.info("packed rows of %d tokens: logprobs within %.2g of padded ones",
             cfg.learner.pack_row_tokens, worst)


def _build_models(cfg: RunConfig, model, device, world: int) -> Models:
    """The policy (DDP-wrapped or FSDP-sharded over the ranks, learner.strategy), its
    optimizer, and the reference model and critic when the algorithm needs them, shared out
    the same way. Under fsdp `model` itself is sharded in place, so build this before anything
    reads the whole model from it."""
    lc = cfg.learner

    def share(m):
        return shard.wrap(m, lc.strategy, world, cfg.model.dtype, lc.activation_checkpointing)

    policy = share(model)
    # With LoRA only the adapters train: the optimizer holds their moments alone.
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lc.lr,
                            weight_decay=lc.weight_decay, eps=lc.adam_eps)
    ref = critic = critic_opt = None
    adapters = lora.is_adapted(model)
    if lc.kl_coef > 0 and not adapters:  # frozen: no master copy, it stays in model.dtype
        ref, _ = load_policy(cfg.model.path, cfg.model.dtype, device.type)
        ref.to(device).eval().requires_grad_(False)
        if lc.strategy == "fsdp" and world > 1:  # DDP has nothing to do for a frozen model
            ref = shard.wrap(ref, "fsdp", world, cfg.model.dtype)
    if lc.advantage == "gae":
        critic = share(load_critic(cfg.model.path, "float32", device.type).to(device).train())
        critic_opt = torch.optim.AdamW(critic.parameters(), lr=lc.critic_lr, eps=lc.adam_eps)
    # With LoRA the reference is the policy with its adapters off: no second copy.
    return Models(policy, opt, ref, critic, critic_opt, ref_is_base=adapters and lc.kl_coef > 0)


class _Stop:
    """SIGTERM and SIGINT (`asyncrl run` stopping, torchrun passing it on) end this rank at
    once, as they always do, except inside `holding()`: between asking the buffer for a batch
    and the batch log holding it, where a rank killed loses the batch's groups (the buffer has
    served them, no log replays them). A signal there ends the rank as soon as the section
    ends, or while it only waits for the buffer and has taken nothing (`check`). Outside the
    section no Python handler is installed, so a rank blocked in a collective dies at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def _note(self, signum, _frame) -> None:
        self.signum = signum

    @contextlib.contextmanager
    def holding(self):
        self._old = {s: signal.signal(s, self._note) for s in self.SIGNALS}
        try:
            yield
        finally:
            self._release()

    def check(self) -> None:
        """Inside holding(), with nothing taken yet: a signal received ends the rank now."""
        if self.signum is not None:
            self._release()

    def _release(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}
        if self.signum is not None:
            signum, self.signum = self.signum, None
            log.info("stopping on signal %d: every batch taken is in the batch log", signum)
            os.kill(os.getpid(), signum)  # as it would have, now that nothing is lost
            time.sleep(5)  # a handler that only raises: let it


@dataclass
class _Source:
    """Where a rank's batches come from and what it accepts from there."""

    buffer: transport.Client
    rules: BatchRules
    vocab_size: int
    rejected: Counter  # LearnerMetrics.messages_rejected, by reason
    stop: _Stop


def _fetch(source: _Source, cfg: RunConfig, rank: int, version: int,
           whole: Whole) -> tuple[list, float, int, int]:
    """This rank's groups for a step at `version`, waiting until the buffer has enough, and
    meanwhile keeping the generators in sync (Whole.keep_in_sync). With dynamic sampling,
    groups whose rewards are all equal are dropped (and counted) and fetching goes on until
    the batch is full.

    Under learner.strategy=fsdp rank 0 cannot push weights while the others wait elsewhere,
    so every rank fetches in rounds, one request per round, and between rounds the ranks
    agree whether all have their batch and, if not, keep in sync together, all gathering.
    Returns (groups, seconds waited, groups filtered, buffer's stale-dropped total)."""
    together = whole if whole.every_rank else None
    t0 = time.perf_counter()
    want = cfg.groups_per_rank
    kept: list = []
    dropped = dropped_total = 0
    while True:
        if len(kept) < want:
            got = _request(source, cfg, rank, version, want - len(kept), whole,
                           once=together is not None, may_stop=not kept)
            if got is not None:
                groups, dropped_total = got
                if cfg.learner.dynamic_sampling:
                    rewards = torch.tensor([[c.reward for c in g.episodes] for g in groups])
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
             whole: Whole, once: bool = False, may_stop: bool = True) -> tuple[list, int] | None:
    """Ask until the buffer has num_groups groups (`once`: None after one answer without
    them). A reply that is not a usable batch is refused, counted and logged, and the request
    sent again: its groups are lost to training (the buffer handed them out), the step is
    not. `may_stop`: nothing taken for this step yet, so a stop signal may end the rank here.
    """
    req = wire.encode("batch_request", version, rank=rank, num_groups=num_groups)
    last_reply = time.monotonic()
    while True:
        if may_stop:
            source.stop.check()
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
        whole.keep_in_sync(version)  # rank 0 of ddp; under fsdp it runs between rounds
        time.sleep(0.02)
