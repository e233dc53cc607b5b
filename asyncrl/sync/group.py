"""The weight-sync process group: learner rank 0 (rank 0 here) plus one rank per generator.

It is separate from the learner's own torch.distributed world and from vLLM's, so forming it
touches neither. Both ends call `init_group` with the same host, port and prefix; the learner
hosts the TCPStore. gloo on CPU, NCCL on GPU: the backend is the only device-specific choice.
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


def init_group(host: str, port: int, rank: int, world_size: int, backend: str,
               timeout_s: float, prefix: str) -> SyncGroup:
    """Join the group (blocking until all world_size ranks have joined or timeout_s passes)."""
    timeout = timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore(host, port, world_size, is_master=(rank == 0), timeout=timeout,
                              wait_for_workers=False)
    except Exception as e:
        raise TimeoutError(
            f"weight-sync group: rank {rank} could not reach the store at {host}:{port} within "
            f"{timeout_s:.0f}s ({e}). Check net.learner_host and that learner rank 0 is up; "
            "the limit is sync.timeout_s") from None
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
            f"weight-sync group ({backend}, world {world_size}): rank {rank} failed to form it "
            f"within {timeout_s:.0f}s: {e}. Every generator and learner rank 0 must join; the "
            "limit is sync.timeout_s") from None
    return SyncGroup(pg, store)


def broadcast(group: SyncGroup, tensor: torch.Tensor, root: int = 0) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank = root
    opts.rootTensor = 0
    group.pg.broadcast([tensor], opts).wait()
