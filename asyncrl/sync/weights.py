"""How a model's tensors are laid out for one broadcast: specs plus one flat buffer per dtype.

One collective per dtype instead of one per tensor: the tiny model has 39 tensors, a 0.5B
model ~290, and per-call latency dominated when each went separately.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from asyncrl import wire

_DT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def specs_of(named: list[tuple[str, torch.Tensor]], dtype: str | None = None) -> list[list]:
    """[[name, dtype, shape], ...] in the order the flat buffers are packed. With `dtype` (the
    engine's, model.dtype), floating tensors travel in it: a learner keeping float32 master
    weights sends bf16 to a bf16 engine, cast as it packs."""
    return [[n, dtype if dtype and t.is_floating_point() else dtype_name(t), list(t.shape)]
            for n, t in named]


def sendable(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The checkpoint-named tensors to send: all of them. A tied lm_head is sent too, though
    it repeats the embedding: on CPU vLLM keeps a processed copy of lm_head after start-up,
    and reloading only the embedding left it stale (logprobs off by 1e-3, measured)."""
    return list(model.state_dict().items())


def pack(named: list[tuple[str, torch.Tensor]],
         out: dict[str, torch.Tensor] | None = None,
         dtype: str | None = None) -> dict[str, torch.Tensor]:
    """dtype name -> one contiguous 1-D buffer with the tensors of that dtype in spec order
    (cast to `dtype` as in specs_of). Pass the previous result as `out` to refill it in place
    (no 2 GB allocation per push)."""
    specs = specs_of(named, dtype)
    if out is None or {dt: b.numel() for dt, b in out.items()} != _sizes(specs):
        out = empty_buffers(specs, named[0][1].device)
    for (_, t), (_, view) in zip(named, unpack(specs, out)):
        view.copy_(t.detach())
    return out


def _sizes(specs: list[list]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for _, dt, shape in specs:
        sizes[dt] = sizes.get(dt, 0) + int(torch.Size(shape).numel())
    return sizes


def empty_buffers(specs: list[list], device: torch.device,
                  reuse: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Flat receive/send buffers for these specs; `reuse` is returned when it already fits."""
    sizes = _sizes(specs)
    if reuse is not None and {dt: b.numel() for dt, b in reuse.items()} == sizes:
        return reuse
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


def push_bytes_bound(model_dir: str | Path) -> int:
    """The most bytes a push of this model can hold, from its weight files: 4x their size (the
    learner may hold a dtype twice as wide as the files, and sends a tied lm_head that the files
    store once) plus 64 MiB. The wire's own bound when the directory holds no weight file."""
    d = Path(model_dir)
    size = sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth")
               for f in d.glob(pattern)) if d.is_dir() else 0
    return 4 * size + 2**26 if size else wire.MAX_WEIGHT_BYTES
