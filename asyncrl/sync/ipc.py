"""Colocated weight sync (`weight_sync.backend=ipc`): the learner and one generator share a GPU.

Nothing is broadcast. The learner packs its weights into the same flat per-dtype buffers as
for a broadcast (asyncrl/sync/weights.py), on its GPU, and sends each buffer's CUDA IPC handle
with the weights_update message; the engine's worker opens the handles, which map the
learner's very memory, and reloads from views of it, then closes them before it confirms. So
a push moves the bytes once, GPU to GPU memory, inside `reload_weights` (verl, OpenRLHF and
TRL's colocate mode do the same; vLLM 0.32's IPC weight-transfer backend is the model for the
handle fields).

Only plain values cross the wire (msgpack: ints, bools, bytes, strings), never pickle: the
handle fields are what `torch.multiprocessing.reductions.reduce_tensor` returns for a CUDA
tensor, less the Python classes, which the receiver supplies itself. Not run on this
project's CPU machines; scripts/gpu-smoke.sh exercises it on a one-GPU host.
"""

from __future__ import annotations

import torch

from asyncrl.sync.weights import _DT, dtype_name


def export(buffers: dict[str, torch.Tensor]) -> list[dict]:
    """One handle per flat buffer (dtype order), for the weights_update message."""
    from torch.multiprocessing.reductions import reduce_tensor

    out = []
    for dt in sorted(buffers):
        buf = buffers[dt]
        if buf.device.type != "cuda" or buf.dim() != 1 or not buf.is_contiguous():
            raise ValueError(f"IPC export needs a contiguous 1-D CUDA buffer, got {buf.device} "
                             f"shape {tuple(buf.shape)}")
        _, args = reduce_tensor(buf)
        (_, size, _stride, offset, _storage_cls, dtype, device, handle, storage_size,
         storage_offset, _grad, ref_handle, ref_offset, event_handle, event_sync) = args
        out.append({"dtype": dtype_name(buf), "numel": int(size[0]), "offset": int(offset),
                    "device_uuid": str(torch.cuda.get_device_properties(device).uuid),
                    "handle": bytes(handle), "storage_size": int(storage_size),
                    "storage_offset": int(storage_offset), "ref_handle": bytes(ref_handle),
                    "ref_offset": int(ref_offset),
                    "event_handle": bytes(event_handle) if event_handle else b"",
                    "event_sync": bool(event_sync)})
    return out


def open_buffers(handles: list[dict], device: torch.device) -> dict[str, torch.Tensor]:
    """The learner's flat buffers, mapped into this process on `device` (same physical GPU)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    uuid = str(torch.cuda.get_device_properties(device).uuid)
    out = {}
    for h in handles:
        if h["device_uuid"] != uuid:
            raise RuntimeError(f"weight_sync.backend=ipc: the learner's weights are on GPU "
                               f"{h['device_uuid']}, this engine is on {uuid}; colocate them "
                               "(generator.device_ids = learner.device_ids) or use nccl")
        out[h["dtype"]] = rebuild_cuda_tensor(
            torch.Tensor, torch.Size([h["numel"]]), (1,), h["offset"], torch.storage.TypedStorage,
            _DT[h["dtype"]], device.index, h["handle"], h["storage_size"], h["storage_offset"],
            False, h["ref_handle"], h["ref_offset"], h["event_handle"] or None, h["event_sync"])
    return out
