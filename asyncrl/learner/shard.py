"""How the learner ranks share a model: DDP (a whole copy per rank) or FSDP2 (sharded).

`learner.strategy=fsdp` applies `torch.distributed.fsdp.fully_shard` to every decoder layer
(the classes a transformers model lists in `_no_split_modules`) and then to the root, which
keeps what is left (embeddings, final norm, lm_head: tied weights must stay in one group). Each
rank then holds 1/world of the parameters as DTensor shards, and its gradients and AdamW
moments are sharded with them. Forward and backward all-gather one layer at a time.

What needs the whole model is a collective under fsdp, which every rank must enter in the same
order: `full_tensors` (weight sync, hub export, checksum) all-gathers one tensor at a time.
With mixed precision (model.dtype bf16/fp16) fsdp computes in that dtype and reduces gradients
in float32, keeping float32 master weights; the CPU and GPU paths differ only in device, dtype
and backend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model (LlamaDecoderLayer, Qwen2DecoderLayer ...)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer class "
                         "(_no_split_modules); learner.strategy=fsdp cannot shard it")
    return layers


def wrap(model: torch.nn.Module, strategy: str, world: int, dtype: str = "float32",
         activation_checkpointing: bool = False) -> torch.nn.Module:
    """The module the learner trains through: `model` itself (one rank), DDP(model), or `model`
    sharded in place by FSDP2 (its class becomes an FSDPModule; names are unchanged)."""
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if world == 1:
        return model
    if strategy == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (MixedPrecisionPolicy(param_dtype=_DTYPES[dtype], reduce_dtype=torch.float32)
          if dtype != "float32" else MixedPrecisionPolicy())
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside (DDP keeps it as .module; FSDP2 shards in place)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_tensors(model: torch.nn.Module, only: Callable[[str], bool] | None = None
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, whole tensor) in state_dict order, one at a time (`only`: the names
    it keeps, the same on every rank). Sharded tensors are all-gathered as they are reached
    (a collective: every rank iterates to the end); the others are the model's own tensors,
    not copies."""
    from torch.distributed.tensor import DTensor

    for name, t in unwrap(model).state_dict().items():
        if only is None or only(name):
            yield name, (t.full_tensor() if isinstance(t, DTensor) else t).detach()


def from_rank0(flag: bool, device: torch.device) -> bool:
    """Rank 0's `flag` on every rank (a broadcast over the learner's process group): how rank
    0's decisions (push now? did it work?) reach the ranks that must take part."""
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def on_every_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on every rank (an all-reduce of the learner's process group)."""
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def local_bytes(tensors) -> int:
    """Bytes this rank holds of these tensors (a DTensor's local shard only)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def clip_grad_norm(parameters, max_norm: float) -> float:
    """clip_grad_norm_ that also works on sharded gradients: the norm of DTensor shards is a
    partial sum until reduced over the ranks (torchtitan does the same)."""
    from torch.distributed.tensor import DTensor

    params = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)
