"""Learner ranks for the 2-rank gloo tests (tests/unit/test_shard.py), started by
torch.multiprocessing.spawn: each joins a process group through a file store, builds the
learner of `_cfg` (critic, reference model, two minibatches) under a strategy and trains."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist


def _setup(rank: int, world: int, store: str, model_dir: str, strategy: str, **overrides):
    from asyncrl.learner.main import _build_models
    from asyncrl.learner.model import load_policy
    from asyncrl.learner.step import warmup_schedule
    from tests.helpers.learner import learner_cfg as _cfg

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = _cfg(model_dir)
    cfg.learner.strategy = strategy
    rank_lora = overrides.pop("lora_rank", 0)
    for k, v in overrides.items():
        setattr(cfg.learner, k, v)
    torch.manual_seed(0)
    model, tok = load_policy(model_dir)
    if rank_lora:  # model.lora: adapters on every linear layer, the learner's own way
        from asyncrl import lora

        cfg.model.lora.rank = rank_lora
        lora.apply(model, rank_lora, 16.0, 0.0, cfg.model.lora.target_modules)
    model.train()
    models = _build_models(cfg, model, torch.device("cpu"), world)
    return cfg, tok, models, warmup_schedule(models.policy_opt, cfg.learner.warmup_steps)


def train(rank: int, world: int, store: str, model_dir: str, strategy: str, steps: int,
          out: str, overrides: dict) -> None:
    """Train `steps` steps on this rank's own batches; rank 0 writes every rank's losses and
    the final weights' checksum to `out`."""
    from asyncrl.learner.batch import collate
    from asyncrl.learner.runlog import named_sha256
    from asyncrl.learner.shard import full_tensors
    from asyncrl.learner.step import train_step
    from tests.helpers.learner import make_groups as _groups

    cfg, tok, models, sched = _setup(rank, world, store, model_dir, strategy, **overrides)
    before = dict(full_tensors(models.policy))
    before = {n: t.clone() for n, t in before.items()}
    losses = []
    for step in range(1, steps + 1):
        batch = collate(_groups(10 * step + rank), tok.pad_token_id)
        losses.append(train_step(models, batch, cfg.learner, 1.0, 6)["loss"])
        sched.step()
    gathered = [None] * world
    dist.all_gather_object(gathered, losses)
    after = dict(full_tensors(models.policy))
    sha = named_sha256(after.items())
    adapter = [n for n in after if n.endswith((".lora_A.weight", ".lora_B.weight"))]
    if rank == 0:
        Path(out).write_text(json.dumps({
            "losses": gathered, "sha256": sha,
            "adapter_moved": any(not torch.equal(after[n], before[n]) for n in adapter),
            "base_kept": all(torch.equal(after[n], before[n]) for n in after
                             if n not in adapter)}))
    dist.destroy_process_group()


def push(rank: int, world: int, store: str, model_dir: str, base: int, bucket_bytes: int,
         out: str) -> None:
    """Train 2 steps sharded, then push through the learner's own push path to a generator
    thread on rank 0; rank 0 writes the checksum the generator received and that of an
    unsharded copy of the weights (gathered by torch.distributed.checkpoint, loaded into a
    plain model) to `out`."""
    from types import SimpleNamespace

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from asyncrl import transport
    from asyncrl.learner.batch import collate
    from asyncrl.learner.model import load_policy
    from asyncrl.learner.runlog import named_sha256, weights_sha256
    from asyncrl.learner.step import train_step
    from asyncrl.learner.whole import Whole
    from asyncrl.sync.sender import WeightSender
    from tests.helpers.learner import make_groups as _groups
    from tests.helpers.sync import HOST, Generator

    cfg, tok, models, sched = _setup(rank, world, store, model_dir, "fsdp")
    for step in (1, 2):
        train_step(models, collate(_groups(10 * step + rank), tok.pad_token_id), cfg.learner,
                   1.0, 6)
        sched.step()
    lead = gen = None
    if rank == 0:
        gen = Generator(0, base)
        gen.start()
        server = transport.Server(transport.context(), HOST, base + 2)
        sender = WeightSender(server, HOST, base + 3, 1, "gloo", timeout_s=60.0,
                              ready_timeout_s=60.0, bucket_bytes=bucket_bytes)
        sender.start()
        lead = SimpleNamespace(sender=sender, push_due=lambda due: due, push_owed=False)
    whole = Whole(cfg, Path(out).parent, models, tok, lead, rank, torch.device("cpu"))
    pushed = whole.push(2, due=True)
    full = get_model_state_dict(models.policy, options=StateDictOptions(full_state_dict=True,
                                                                        cpu_offload=True))
    if rank == 0:
        plain, _ = load_policy(model_dir)
        plain.load_state_dict(full)
        gen.stop.set()
        gen.join()
        Path(out).write_text(json.dumps({
            "pushed_bytes": pushed[1], "received": named_sha256(gen.engine.weights.items()),
            "unsharded": weights_sha256(plain), "initial": weights_sha256(load_policy(model_dir)[0]),
            "peak_buffer_bytes": lead.sender.peak_buffer_bytes}))
    dist.destroy_process_group()


def resume(rank: int, world: int, store: str, model_dir: str, run_dir: str, resumed: bool,
           out: str, lora_rank: int = 0) -> None:
    """4 steps sharded with a sharded checkpoint at step 2 (resumed=False), or from that
    checkpoint on (resumed=True, a fresh set of processes as after a torchrun restart); rank 0
    writes the final checksum, and the hub-format export's (with lora_rank, the exported
    adapter file's), to `out`."""
    import hashlib

    from asyncrl.learner import checkpoint
    from asyncrl.learner.batch import collate
    from asyncrl.learner.model import load_policy
    from asyncrl.learner.runlog import named_sha256, weights_sha256
    from asyncrl.learner.shard import full_tensors
    from asyncrl.learner.step import train_step
    from tests.helpers.learner import make_groups as _groups

    # LoRA without a critic (a full model of its own): the checkpoint is then the adapters
    overrides = {"lora_rank": lora_rank, "lr": 1e-2, "advantage": "grpo"} if lora_rank else {}
    cfg, tok, models, sched = _setup(rank, world, store, model_dir, "fsdp", **overrides)
    start = 0
    if resumed:
        ckpt = checkpoint.latest(Path(run_dir))
        checkpoint.restore_sharded(ckpt, models, sched, rank)
        start = ckpt.step
    for step in range(start + 1, 5):
        train_step(models, collate(_groups(10 * step + rank), tok.pad_token_id), cfg.learner,
                   1.0, 6)
        sched.step()
        if step == 2 and not resumed:
            checkpoint.save_sharded(Path(run_dir), step, models, sched, {}, rank)
    sha = named_sha256(full_tensors(models.policy))
    exported = checkpoint.export(Path(run_dir) / "export" / f"resumed{int(resumed)}",
                                 models.policy, tok, rank)
    if rank == 0:
        export = (hashlib.sha256((exported / "adapter_model.safetensors").read_bytes())
                  .hexdigest() if lora_rank else weights_sha256(load_policy(exported)[0]))
        files = sorted(p.name for p in (Path(run_dir) / "checkpoints" / "step_2" /
                                        "sharded").iterdir())
        Path(out).write_text(json.dumps({"sha256": sha, "export": export,
                                         "checkpoint_bytes": sum(
            p.stat().st_size for p in (Path(run_dir) / "checkpoints" / "step_2" /
                                       "sharded").iterdir()), "files": files}))
    dist.barrier()  # both ranks done before either tears its group down
    dist.destroy_process_group()
