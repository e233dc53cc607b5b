"""Learner checkpoints, and what a restarted learner resumes from.

RUN_DIR/checkpoints/step_<n>/ holds the policy in hub format (model.safetensors, config,
tokenizer: loadable by transformers and vLLM as it is; with model.lora its peft-format adapter
instead, loadable by peft and as a vLLM LoRARequest, the base being model.path) plus
trainer_state.pt (optimizer, learning-rate schedule, critic and its optimizer, torch RNG
state) and asyncrl_state.json (step, counters). A checkpoint is written to a temporary
directory and renamed into place, so every step_<n> directory is complete: a rank killed
mid-write leaves the previous one newest.

Under learner.strategy=fsdp a checkpoint is sharded instead: step_<n>/sharded/ is a
torch.distributed.checkpoint of the policy, its optimizer, the critic and its optimizer, each
rank writing its own shards (the same directory can be loaded by another number of ranks), and
step_<n>/rank<r>.pt holds each rank's schedule and RNG state. No rank ever holds the whole
model or optimizer for it. Users get hub-format weights from `export` (RUN_DIR/export/...).

Resume (torchrun --max-restarts restarts every rank after a failure): each rank loads the
newest checkpoint, step k, then replays steps k+1.. from its own batch log
(asyncrl/learner/runlog.py), which holds every batch it had taken from the buffer before the
crash. That log is the buffer's cursor: the buffer hands out each group once, so the batches of
the replayed steps are exactly the ones trained on before, and the weights after the replay are
the ones the generators already hold (same batches, same RNG, same order: deterministic on the
same machine). Rank 0 drops metrics.jsonl rows after step k first, so no step is counted twice.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from asyncrl import lora
from asyncrl.jsonl import read_jsonl
from asyncrl.learner.step import Models


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict  # asyncrl_state.json


def newest_step(run_dir: Path) -> int:
    """The step of the newest complete checkpoint under RUN_DIR/checkpoints (0: none)."""
    root = run_dir / "checkpoints"
    steps = [0]
    for d in root.glob("step_*") if root.is_dir() else []:
        if d.name.removeprefix("step_").isdigit() and (d / "asyncrl_state.json").is_file():
            steps.append(int(d.name.removeprefix("step_")))
    return max(steps)


def latest(run_dir: Path) -> Checkpoint | None:
    """The newest complete checkpoint under RUN_DIR/checkpoints, or None."""
    step = newest_step(run_dir)
    if not step:
        return None
    path = run_dir / "checkpoints" / f"step_{step}"
    return Checkpoint(path, step, json.loads((path / "asyncrl_state.json").read_text()))


def save(run_dir: Path, step: int, model, tok, models: Models, sched, state: dict) -> Path:
    """Write checkpoint `step` atomically. `model` is the unwrapped policy."""
    root = run_dir / "checkpoints"
    tmp, out = root / f".step_{step}.tmp", root / f"step_{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    if lora.is_adapted(model):  # the adapter alone: the base is model.path, unchanged
        lora.save_adapter(tmp, lora.config_of(model),
                          lora.adapter_tensors(model.state_dict().items()))
    else:
        model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    critic = _unwrap(models.critic) if models.critic is not None else None
    torch.save({
        "optimizer": models.policy_opt.state_dict(),
        "scheduler": sched.state_dict(),
        "critic": critic.state_dict() if critic is not None else None,
        "critic_optimizer": (models.critic_opt.state_dict() if models.critic_opt is not None
                             else None),
        "torch_rng": torch.get_rng_state(),
    }, tmp / "trainer_state.pt")
    # Written last: its presence marks the directory complete (see latest()).
    (tmp / "asyncrl_state.json").write_text(json.dumps({**state, "step": step,
                                                        "policy_version": step}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def is_sharded(ckpt: Checkpoint) -> bool:
    return (ckpt.path / "sharded").is_dir()


def save_sharded(run_dir: Path, step: int, models: Models, sched, state: dict,
                 rank: int) -> Path:
    """Write checkpoint `step` from every rank (a collective): each rank's shards, then rank 0
    marks the directory complete and renames it into place."""
    import torch.distributed.checkpoint as dcp

    root = run_dir / "checkpoints"
    tmp, out = root / f".step_{step}.tmp", root / f"step_{step}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    dcp.save(_sharded_state(models), checkpoint_id=tmp / "sharded")
    torch.save({"scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state()},
               tmp / f"rank{rank}.pt")
    _barrier()  # every rank's files are written
    if rank == 0:
        (tmp / "asyncrl_state.json").write_text(json.dumps({**state, "step": step,
                                                            "policy_version": step}))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    _barrier()  # nobody goes on (and may crash) before the checkpoint is in place
    return out


def restore_sharded(ckpt: Checkpoint, models: Models, sched, rank: int) -> None:
    """Load a sharded checkpoint into models built on the starting weights (every rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _sharded_state(models)
    dcp.load(state, checkpoint_id=ckpt.path / "sharded")
    set_state_dict(models.policy, models.policy_opt, model_state_dict=state["policy"],
                   optim_state_dict=state["policy_optimizer"], options=_policy_options(models))
    if models.critic is not None:
        if "critic" not in state:
            raise ValueError(f"{ckpt.path} has no critic but learner.advantage=gae needs one")
        set_state_dict(models.critic, models.critic_opt, model_state_dict=state["critic"],
                       optim_state_dict=state["critic_optimizer"])
    st = torch.load(ckpt.path / f"rank{rank}.pt", weights_only=False)
    sched.load_state_dict(st["scheduler"])
    torch.set_rng_state(st["torch_rng"])


def _policy_options(models: Models):
    """With LoRA (model.lora) a sharded checkpoint holds the adapters alone: the frozen base
    is model.path, which the restarted rank loads before the checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    adapted = lora.is_adapted(models.policy)
    return StateDictOptions(ignore_frozen_params=adapted, strict=not adapted)


def _sharded_state(models: Models) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    policy, policy_opt = get_state_dict(models.policy, models.policy_opt,
                                        options=_policy_options(models))
    state = {"policy": policy, "policy_optimizer": policy_opt}
    if models.critic is not None:
        state["critic"], state["critic_optimizer"] = get_state_dict(models.critic,
                                                                    models.critic_opt)
    return state


def export(out: Path, policy, tok, rank: int, merged: bool = False) -> Path | None:
    """Hub-format weights (safetensors, config, tokenizer) of a possibly sharded policy, written
    by rank 0 to `out` (atomically). A collective under fsdp: the full weights are gathered
    to rank 0's CPU memory for the write, the one moment a rank holds them all. A policy with
    LoRA adapters (model.lora) is written as its peft-format adapter (with the tokenizer),
    or with `merged` as hub-format weights with the adapters folded in."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from asyncrl.learner.shard import unwrap

    if dist.is_available() and dist.is_initialized():
        full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True,
                                                                     cpu_offload=True))
    else:
        full = unwrap(policy).state_dict()
    if rank != 0:
        return None
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = unwrap(policy)
    if lora.is_adapted(model) and not merged:
        lora.save_adapter(tmp, lora.config_of(model), lora.adapter_tensors(full.items()))
    else:
        if lora.is_adapted(model):
            full = lora.merged_state(full.items(), lora.layers(model)[0].scaling)
        model.save_pretrained(tmp, state_dict=full, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def restore(ckpt: Checkpoint, models: Models, sched) -> None:
    """Load the optimizer, schedule, critic and RNG state. The policy's weights were loaded
    from ckpt.path already (load_policy), before the optimizer was built on them."""
    # Onto the device this rank trains on, not the one rank 0 saved from: every rank of a GPU
    # learner would otherwise load the optimizer state onto cuda:0 at once.
    device = next(_unwrap(models.policy).parameters()).device
    st = torch.load(ckpt.path / "trainer_state.pt", weights_only=False, map_location=device)
    models.policy_opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    if models.critic is not None:
        if st["critic"] is None:
            raise ValueError(f"{ckpt.path} has no critic but learner.advantage=gae needs one")
        _unwrap(models.critic).load_state_dict(st["critic"])
        models.critic_opt.load_state_dict(st["critic_optimizer"])
    torch.set_rng_state(st["torch_rng"])


def truncate_metrics(path: Path, step: int, count_gap: bool = True) -> float:
    """Drop rows after `step` from metrics.jsonl (they are recomputed by the replay). Returns
    the run's elapsed time now: the last row's elapsed_s plus, with `count_gap` (a torchrun
    restart), the time since it was written, so the wall time lost to the crash and the
    restart counts in time-to-accuracy. A run resumed by a new `asyncrl run` does not count
    the time it was stopped (hours, maybe), which is not the run's."""
    if not path.is_file():
        return 0.0
    rows = read_jsonl(path)
    elapsed = (max((r.get("elapsed_s") or 0.0 for r in rows), default=0.0)
               + (max(0.0, time.time() - path.stat().st_mtime) if count_gap else 0.0))
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step))
    tmp.replace(path)
    return elapsed


def _unwrap(m: torch.nn.Module) -> torch.nn.Module:
    from asyncrl.learner.shard import unwrap

    return unwrap(m)
