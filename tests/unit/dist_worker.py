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
    from tests.unit.test_checkpoint import _cfg

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = _cfg(model_dir)
    cfg.learner.strategy = strategy
    for k, v in overrides.items():
        setattr(cfg.learner, k, v)
    torch.manual_seed(0)
    model, tok = load_policy(model_dir)
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
    from tests.unit.test_checkpoint import _groups

    cfg, tok, models, sched = _setup(rank, world, store, model_dir, strategy, **overrides)
    losses = []
    for step in range(1, steps + 1):
        batch = collate(_groups(10 * step + rank), tok.pad_token_id)
        losses.append(train_step(models, batch, cfg.learner, 1.0, 6)["loss"])
        sched.step()
    gathered = [None] * world
    dist.all_gather_object(gathered, losses)
    sha = named_sha256(full_tensors(models.policy))
    if rank == 0:
        Path(out).write_text(json.dumps({"losses": gathered, "sha256": sha}))
    dist.destroy_process_group()
