"""The weight-sync process group: learner rank 0 (rank 0 here) plus one rank per generator.

It is separate from the learner's own torch.distributed world and from vLLM's, so forming it
touches neither. Learner rank 0 hosts a TCPStore; each *session* of the group lives under its
own key prefix on it (asyncrl/sync/<session>), so the group can re-form after a learner or
generator restart without a new port (asyncrl/sync/sender.py decides when). gloo on CPU, NCCL on
GPU: the backend is the only device-specific choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return backend


@dataclass
class SyncGroup:
    pg: Any  # ProcessGroupGloo | ProcessGroupNCCL
    store: Any  # kept referenced: the group dies with its store


def open_store(host: str, port: int, is_master: bool, timeout_s: float):
    """Learner rank 0 hosts the TCPStore (one per learner process, reused by every session);
    generators connect a client to it for each session they join."""
    try:
        return dist.TCPStore(host, port, None, is_master=is_master,
                             timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    except Exception as e:
        role = "host" if is_master else "reach"
        raise TimeoutError(
            f"weight-sync group: could not {role} the store at {host}:{port} within "
            f"{timeout_s:.0f}s ({e}). Check net.learner_host and that learner rank 0 is up; "
            "the limit is sync.timeout_s") from None


def join(store, prefix: str, rank: int, world_size: int, backend: str,
         timeout_s: float) -> SyncGroup:
    """Form the group under `prefix` (blocking until all world_size ranks joined or timeout_s).
    A fresh prefix per session is what lets a group re-form on the same store and port."""
    timeout = timedelta(seconds=timeout_s)
    pstore = dist.PrefixStore(prefix, store)
    backend = resolve_backend(backend)
    try:
        if backend == "gloo":
            pg = dist.ProcessGroupGloo(pstore, rank, world_size, timeout)
        else:
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            pg = dist.ProcessGroupNCCL(pstore, rank, world_size, opts)
    except Exception as e:
        raise TimeoutError(
            f"weight-sync group {prefix} ({backend}, world {world_size}): rank {rank} failed "
            f"to form it within {timeout_s:.0f}s: {e}. Every generator and learner rank 0 must "
            "join; the limit is sync.timeout_s") from None
    return SyncGroup(pg, store)


def init_group(host: str, port: int, rank: int, world_size: int, backend: str,
               timeout_s: float, prefix: str) -> SyncGroup:
    """Join a group on a store of its own connection (rank 0 hosts the store)."""
    return join(open_store(host, port, rank == 0, timeout_s), prefix, rank, world_size, backend,
                timeout_s)


def broadcast(group: SyncGroup, tensor: torch.Tensor, root: int = 0) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank = root
    opts.rootTensor = 0
    group.pg.broadcast([tensor], opts).wait()
