"""How a push's tensors reach the engines: one small interface, `WeightTransfer`, and its
implementations, both ends of each side by side.

A push is the same whatever the transfer (asyncrl/sync/sender.py): the learner announces it
with a weights_update (the tensor specs, plus what the transfer adds to it), sends the
tensors, and waits for every generator's weights_loaded. What differs is how the bytes travel:

  Broadcast   a process group of the learner's rank 0 and every generator worker (gloo on
              CPU, NCCL on GPUs), formed once per weight-sync session; the tensors go in
              buckets of weight_sync.bucket_mb, each filled while the previous one is on the wire
              (asyncrl/sync/weights.py), and each worker loads bucket by bucket.
  CudaIpc     colocated on one GPU (weight_sync.backend=ipc): no group; the tensors are packed into
              flat buffers on the learner's GPU and the weights_update carries their CUDA IPC
              handles (asyncrl/sync/ipc.py), which the worker maps and loads from.

Learner side: `connect` when a session forms (with every member), `announce` the fields the
weights_update carries, `send` after it, `close` when the session is dropped. Engine side
(inside the vLLM worker, asyncrl/sync/receiver.py): `incoming` yields the pushed tensors for
the engine's `reload_weights`.

  Adapter     model.lora: the LoRA adapter's tensors only (a few MB where the weights are
              hundreds), over the same bucketed broadcast; the weights_update carries the
              adapter's shape (rank, alpha, target modules). The engine side writes them as a
              peft-format directory in memory-backed files (/dev/shm) and loads it as that
              version's own adapter (asyncrl/generator/engine.py): vLLM 0.32 loads adapters
              from a directory only.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Protocol

import torch

from asyncrl.sync import group, weights

Named = tuple[str, torch.Tensor]


class WeightTransfer(Protocol):
    name: str
    peak_buffer_bytes: int  # the most bytes of push buffers held at once (learner side)

    @property
    def connected(self) -> bool: ...

    def connect(self, store, prefix: str, world: int) -> None:
        """A session formed: open the channel to its members (the store keys under
        `prefix`, `world` ranks with the learner as rank 0)."""

    def announce(self, specs: list[list], tensors: Iterator[Named]) -> dict:
        """The weights_update fields that say how the push travels (`ipc`, `bucket_bytes`,
        `adapter`), before it is sent."""

    def send(self, specs: list[list], tensors: Iterator[Named]) -> None:
        """The push's tensors, after the announcement; `tensors` is consumed."""

    def close(self) -> None:
        """Drop the channel (a push failed, or the session is re-formed)."""


class Broadcast:
    name = "broadcast"

    def __init__(self, backend: str, host: str, timeout_s: float, bucket_bytes: int):
        self.backend, self.host, self.timeout_s = backend, host, timeout_s
        self.bucket_bytes = bucket_bytes
        self.pg: group.SyncGroup | None = None
        self._buckets: list[torch.Tensor] = []  # the two bucket buffers, reused every push
        self.peak_buffer_bytes = 0

    @property
    def connected(self) -> bool:
        return self.pg is not None

    def connect(self, store, prefix: str, world: int) -> None:
        self.close()  # the old group first (its peers' pending receives then fail)
        self.pg = group.join(store, prefix, 0, world, self.backend, self.timeout_s,
                             bind_host=self.host)

    def announce(self, specs: list[list], tensors: Iterator[Named]) -> dict:
        return {"ipc": [], "bucket_bytes": self.bucket_bytes, "adapter": {}}

    def send(self, specs: list[list], tensors: Iterator[Named]) -> None:
        """Fill bucket i + 1 while bucket i is on the wire; two buffers in all."""
        plan = weights.plan_buckets(specs, self.bucket_bytes)
        if not plan:
            return
        first = next(tensors)
        tensors = itertools.chain([first], tensors)
        size, device = weights.largest_bucket(plan), first[1].device
        if not (len(self._buckets) == 2 and self._buckets[0].numel() >= size
                and self._buckets[0].device == device):
            self._buckets = []  # the old ones go before the new ones are allocated
            self._buckets = [torch.empty(size, dtype=torch.uint8, device=device)
                             for _ in range(2)]
        self.peak_buffer_bytes = max(self.peak_buffer_bytes,
                                     sum(b.numel() for b in self._buckets))
        pending: group.Broadcast | None = None
        for bucket in weights.fill_buckets(specs, plan, tensors, self._buckets):
            if pending is not None:
                pending.wait()
            pending = group.start_broadcast(self.pg, bucket, root=0, timeout_s=self.timeout_s)
        pending.wait()

    def close(self) -> None:
        group.abort(self.pg)
        self.pg = None

    @staticmethod
    def incoming(specs: list[list], bucket_bytes: int, pg, timeout_s: float,
                 pool: weights.BucketPool) -> Iterator[Named]:
        """Engine side: the pushed tensors, bucket k + 1's broadcast started as soon as
        bucket k has arrived, so the engine loads one bucket while the next is on the wire."""

        def recv(buf):
            return group.start_broadcast(pg, buf, root=0, timeout_s=timeout_s)

        plan = weights.plan_buckets(specs, bucket_bytes)
        return weights.received_tensors(specs, plan, recv, pool, overlap=True)


class CudaIpc:
    name = "ipc"

    def __init__(self, dtype: str | None):
        self.dtype = dtype
        self._bufs: dict[str, torch.Tensor] | None = None  # refilled in place every push
        self._connected = False
        self.peak_buffer_bytes = 0

    @property
    def connected(self) -> bool:
        return self._connected

    def connect(self, store, prefix: str, world: int) -> None:
        self._connected = True  # nothing to form: the handles travel with each push

    def announce(self, specs: list[list], tensors: Iterator[Named]) -> dict:
        from asyncrl.sync import ipc

        bufs = self._bufs = weights.pack(list(tensors), self._bufs, self.dtype)
        self.peak_buffer_bytes = max(self.peak_buffer_bytes, weights.nbytes(bufs))
        return {"ipc": ipc.export(bufs), "bucket_bytes": weights.DEFAULT_BUCKET_BYTES,
                "adapter": {}}

    def send(self, specs: list[list], tensors: Iterator[Named]) -> None:
        pass  # the engine reads the buffers the announcement pointed it to

    def close(self) -> None:
        self._connected = False

    @staticmethod
    def incoming(specs: list[list], handles: list[dict], device) -> tuple[Iterator[Named], dict]:
        """Engine side: views of the learner's buffers (and the buffers, to release after)."""
        from asyncrl.sync import ipc

        bufs = ipc.open_buffers(handles, device)
        return weights.unpack(specs, bufs), bufs


class Adapter(Broadcast):
    """The adapter's tensors (peft's names) broadcast like the weights, but always over gloo
    from host memory (RunConfig.sync_backend): a few MB, copied off the GPU first, and it
    works colocated on one GPU too. The announcement says which adapter they make
    (`adapter`: r, lora_alpha, target_modules)."""

    name = "adapter"

    def __init__(self, backend: str, host: str, timeout_s: float, bucket_bytes: int,
                 adapter: dict):
        super().__init__(backend, host, timeout_s, bucket_bytes)
        self.adapter = adapter

    def announce(self, specs: list[list], tensors: Iterator[Named]) -> dict:
        return {**super().announce(specs, tensors), "adapter": self.adapter}

    def send(self, specs: list[list], tensors: Iterator[Named]) -> None:
        super().send(specs, ((n, t.cpu()) for n, t in tensors))

    @staticmethod
    def incoming(specs: list[list], bucket_bytes: int, pg, timeout_s: float,
                 pool: weights.BucketPool) -> dict[str, torch.Tensor]:
        """Engine side: the adapter's tensors, copied out of the bucket buffers (they are
        written to a file after the last bucket, when the buffers hold other tensors)."""
        return {n: t.clone() for n, t in Broadcast.incoming(specs, bucket_bytes, pg,
                                                            timeout_s, pool)}


def for_backend(backend: str, host: str, timeout_s: float, bucket_bytes: int,
                dtype: str | None, adapter: dict | None = None) -> WeightTransfer:
    """weight_sync.backend's transfer: `ipc` colocated, else a broadcast over gloo or nccl;
    with `adapter` (model.lora's r, lora_alpha, target_modules) the adapter's broadcast."""
    if adapter:
        return Adapter("gloo", host, timeout_s, bucket_bytes, adapter)
    if backend == "ipc":
        return CudaIpc(dtype)
    return Broadcast(backend, host, timeout_s, bucket_bytes)
