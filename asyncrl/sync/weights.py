"""How a model's tensors are laid out for one broadcast: specs plus one flat buffer per dtype.

One collective per dtype instead of one per tensor: the tiny model has 39 tensors, a 0.5B
model ~290, and per-call latency dominated when each went separately.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

_DT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def specs_of(named: list[tuple[str, torch.Tensor]]) -> list[list]:
    """[[name, dtype, shape], ...] in the order the flat buffers are packed."""
    return [[n, dtype_name(t), list(t.shape)] for n, t in named]


def pack(named: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """dtype name -> one contiguous 1-D buffer with the tensors of that dtype in spec order."""
    by_dtype: dict[str, list[torch.Tensor]] = {}
    for _, t in named:
        by_dtype.setdefault(dtype_name(t), []).append(t.detach().reshape(-1))
    return {dt: torch.cat(ts) for dt, ts in by_dtype.items()}


def empty_buffers(specs: list[list], device: torch.device) -> dict[str, torch.Tensor]:
    sizes: dict[str, int] = {}
    for _, dt, shape in specs:
        sizes[dt] = sizes.get(dt, 0) + int(torch.Size(shape).numel())
    return {dt: torch.empty(n, dtype=_DT[dt], device=device) for dt, n in sizes.items()}


def unpack(specs: list[list], buffers: dict[str, torch.Tensor]
           ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, view) pairs over the flat buffers, in spec order; no copies."""
    offsets = dict.fromkeys(buffers, 0)
    for name, dt, shape in specs:
        n = int(torch.Size(shape).numel())
        yield name, buffers[dt][offsets[dt] : offsets[dt] + n].view(shape)
        offsets[dt] += n


def nbytes(buffers: dict[str, torch.Tensor]) -> int:
    return sum(b.numel() * b.element_size() for b in buffers.values())
