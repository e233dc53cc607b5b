"""How a model's tensors are laid out for a push: specs, then buckets of bytes.

A push broadcasts the tensors in spec order packed into buckets of at most `bucket_bytes`
(weight_sync.bucket_mb; a larger tensor goes alone). Both ends derive the same buckets from the
specs (plan_buckets), so only the specs and the bucket size travel in the weights_update message.
Bucketing keeps collectives few (the tiny model has 39 tensors, a 0.5B model ~290, and
per-call latency dominated when each went separately) without a flat copy of the whole model:
the sender fills one bucket while the previous one is on the wire (sender.py), the receiver
hands each bucket's tensors to the engine before receiving the next (receiver.py), so each end
holds about two buckets beyond the model itself.

The colocated path (weight_sync.backend=ipc) still packs one flat buffer per dtype (pack): the
engine maps those buffers by CUDA IPC handle, so nothing is copied twice there.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from asyncrl import wire

_DT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SIZE = {name: torch.empty(0, dtype=dt).element_size() for name, dt in _DT.items()}


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def specs_of(named: list[tuple[str, torch.Tensor]], dtype: str | None = None) -> list[list]:
    """[[name, dtype, shape], ...] in the order the flat buffers are packed. With `dtype` (the
    engine's, model.dtype), floating tensors travel in it: a learner keeping float32 master
    weights sends bf16 to a bf16 engine, cast as it packs."""
    return [[n, dtype if dtype and t.is_floating_point() else dtype_name(t), list(t.shape)]
            for n, t in named]


def sendable(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The checkpoint-named tensors to send: all of them, or with LoRA adapters on the model
    (model.lora) the adapters' alone, in peft's names (asyncrl/lora.py). A tied lm_head is
    sent too, though it repeats the embedding: on CPU vLLM keeps a processed copy of lm_head
    after start-up, and reloading only the embedding leaves it stale (logprobs off by 1e-3,
    measured). Under FSDP these are DTensor shards: their specs (global shapes) are right,
    their data is gathered by asyncrl.learner.shard.full_tensors."""
    from asyncrl import lora

    named = model.state_dict().items()
    return list(lora.adapter_tensors(named) if lora.is_adapted(model) else named)


def dir_tensors(path: str):
    """The tensors of a hub-format directory (its *.safetensors), as `sendable` would name
    them: a tied lm_head, which save_pretrained leaves out, comes back as the embedding (see
    sendable for why it must be loaded). For the evaluator (generator.eval_engine)."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    d = Path(path)
    names: set[str] = set()
    embed = None
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open has no __iter__
                t = st.get_tensor(name)
                names.add(name)
                if name == "model.embed_tokens.weight":
                    embed = t
                yield name, t
    if not names:
        raise FileNotFoundError(f"{d} holds no *.safetensors weights")
    tied = json.loads((d / "config.json").read_text()).get("tie_word_embeddings", False)
    if tied and "lm_head.weight" not in names and embed is not None:
        yield "lm_head.weight", embed


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


DEFAULT_BUCKET_BYTES = wire.DEFAULT_BUCKET_BYTES
ALIGN = 64  # byte offset of every tensor in a bucket: aligned views for any dtype


@dataclass(frozen=True)
class Bucket:
    nbytes: int
    entries: list[tuple[int, int]]  # (index into the specs, byte offset in the bucket)


def plan_buckets(specs: list[list], bucket_bytes: int) -> list[Bucket]:
    """The specs, in order, cut into buckets of at most bucket_bytes (a tensor larger than that
    fills a bucket alone). The same function on both ends gives the same buckets."""
    out: list[Bucket] = []
    entries: list[tuple[int, int]] = []
    used = 0
    for i, (_, dt, shape) in enumerate(specs):
        n = int(torch.Size(shape).numel()) * _SIZE[dt]
        if entries and used + n > bucket_bytes:
            out.append(Bucket(used, entries))
            entries, used = [], 0
        entries.append((i, used))
        used += -(-n // ALIGN) * ALIGN
    if entries:
        out.append(Bucket(used, entries))
    return out


def view_in(buf: torch.Tensor, offset: int, spec: list) -> torch.Tensor:
    """The tensor of `spec` at byte `offset` of a uint8 bucket buffer (a view, no copy)."""
    _, dt, shape = spec
    n = int(torch.Size(shape).numel()) * _SIZE[dt]
    return buf[offset : offset + n].view(_DT[dt]).view(shape)


def fill_buckets(specs: list[list], plan: list[Bucket], tensors: Iterable[tuple[str, torch.Tensor]],
                 buffers: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Copy `tensors` (in spec order, cast to each spec's dtype) into the buffers in turn and
    yield each bucket, a view of one of them, as soon as it is full. Alternate buffers are
    used, so the caller may still be sending the previous bucket while the next is filled;
    the caller waits for bucket i before asking for bucket i + 2."""
    it = iter(tensors)
    for i, bucket in enumerate(plan):
        buf = buffers[i % len(buffers)]
        for index, offset in bucket.entries:
            name, t = next(it)
            if name != specs[index][0]:
                raise RuntimeError(f"weight push: got tensor {name!r} where the announced "
                                   f"specs have {specs[index][0]!r}")
            view_in(buf, offset, specs[index]).copy_(t)
        yield buf[: bucket.nbytes]


class BucketPool:
    """The receiver's bucket buffers, reused across buckets and pushes. The engine may keep
    views of a bucket after the iterator has moved on (vLLM's layerwise reload holds a layer's
    weights until the whole layer has arrived), so a buffer is reused only when no view of it
    is left; otherwise a fresh one takes its place and the old one lives as long as the
    engine's views do."""

    def __init__(self, device: torch.device, slots: int = 2):
        self.device, self.slots = device, slots
        self.buffers: list[tuple[torch.Tensor, int]] = []  # (buffer, its own reference count)
        self.allocated_bytes = 0  # over the pool's life: how often the engine held on

    def take(self, nbytes: int) -> torch.Tensor:
        for buf, own in self.buffers:
            if buf.numel() >= nbytes and _refs(buf) == own:
                return buf
        buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self.allocated_bytes += nbytes
        entry = (buf, _refs(buf))
        if len(self.buffers) < self.slots:
            self.buffers.append(entry)
        else:  # drop the oldest (still referenced by the engine, or too small)
            self.buffers = [*self.buffers[1:], entry]
        return buf


def _refs(buf: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(buf.untyped_storage()._cdata)


def received_tensors(specs: list[list], plan: list[Bucket], recv, pool: BucketPool,
                     overlap: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, view) in spec order, bucket by bucket: pass this lazily to the engine's load, and
    the model is received bucket by bucket.

    `recv(buffer)` fills a bucket's buffer, and the next bucket is received only when this
    one's tensors have all been taken. With `overlap`, `recv` only starts filling it and
    returns the transfer (group.start_broadcast: something to `wait()` on); the next bucket's
    transfer then starts once the loader has taken this bucket's first tensor, so the engine
    loads the rest of bucket k while bucket k+1 is on the wire, still with two buffers."""

    def start(i: int):
        if i >= len(plan):
            return None
        buf = pool.take(plan[i].nbytes)[: plan[i].nbytes]
        return buf, recv(buf)

    nxt = start(0)
    for i, bucket in enumerate(plan):
        buf, transfer = nxt
        if overlap:
            transfer.wait()
        for j, (index, offset) in enumerate(bucket.entries):
            yield specs[index][0], view_in(buf, offset, specs[index])
            if overlap and j == 0:
                # The loader has taken this bucket's first tensor and so let go of the last
                # bucket's: its buffer is free for the next one, on the wire during this load.
                nxt = start(i + 1)
        del buf, transfer
        if not overlap:
            nxt = start(i + 1)


def largest_bucket(plan: list[Bucket]) -> int:
    return max((b.nbytes for b in plan), default=0)


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
