"""The weight-sync process group: learner rank 0 (rank 0 here) plus one rank per generator.

It is separate from the learner's own torch.distributed world and from vLLM's, so forming it
touches neither. Learner rank 0 hosts a TCPStore; each *session* of the group lives under its
own key prefix on it (asyncrl/sync/<session>), so the group can re-form after a learner or
generator restart without a new port (asyncrl/sync/sender.py decides when). gloo on CPU, NCCL on
GPU: the backend is the only device-specific choice.

Neither the store nor the group can be authenticated (torch has no such option), so they are
kept as narrow as torch allows: the store listens only on the learner's net.bind_host, rank 0's
gloo device is bound to that address too, and each session's key prefix carries a random token
that only the generators told over the authenticated control channel (CurveZMQ) know, so a peer
that reaches the store cannot find the session's keys to join it. See docs/architecture.md.
"""

from __future__ import annotations

import socket
import time
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
        # The host binds its own listening socket so that the store listens on `host` only
        # (TCPStore alone listens on every interface).
        fd = _listen(host, port) if is_master else None
        return dist.TCPStore(host, port, None, is_master=is_master,
                             timeout=timedelta(seconds=timeout_s), wait_for_workers=False,
                             master_listen_fd=fd)
    except Exception as e:
        role = "host" if is_master else "reach"
        raise TimeoutError(
            f"weight-sync group: could not {role} the store at {host}:{port} within "
            f"{timeout_s:.0f}s ({e}). Check net.learner_host and that learner rank 0 is up; "
            "the limit is weight_sync.timeout_s") from None


def _listen(host: str, port: int) -> int:
    """A listening socket on host:port, handed over to the store (which then owns the fd)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
        s.listen(128)
    except OSError:
        s.close()
        raise
    return s.detach()


def join(store, prefix: str, rank: int, world_size: int, backend: str,
         timeout_s: float, bind_host: str = "") -> SyncGroup:
    """Form the group under `prefix` (blocking until all world_size ranks joined or timeout_s).
    A fresh prefix per session is what lets a group re-form on the same store and port.
    bind_host (gloo): the address this rank's gloo device listens on; "" or a wildcard lets
    gloo pick from the host name."""
    timeout = timedelta(seconds=timeout_s)
    pstore = dist.PrefixStore(prefix, store)
    backend = resolve_backend(backend)
    try:
        if backend == "gloo" and bind_host not in ("", "0.0.0.0", "::"):
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = timeout
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=bind_host)]
            pg = dist.ProcessGroupGloo(pstore, rank, world_size, opts)
        elif backend == "gloo":
            pg = dist.ProcessGroupGloo(pstore, rank, world_size, timeout)
        else:
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            pg = dist.ProcessGroupNCCL(pstore, rank, world_size, opts)
    except Exception as e:
        raise TimeoutError(
            f"weight-sync group {prefix} ({backend}, world {world_size}): rank {rank} failed "
            f"to form it within {timeout_s:.0f}s: {e}. Every generator and learner rank 0 must "
            "join; the limit is weight_sync.timeout_s") from None
    return SyncGroup(pg, store)


def init_group(host: str, port: int, rank: int, world_size: int, backend: str,
               timeout_s: float, prefix: str) -> SyncGroup:
    """Join a group on a store of its own connection (rank 0 hosts the store)."""
    return join(open_store(host, port, rank == 0, timeout_s), prefix, rank, world_size, backend,
                timeout_s)


def broadcast(group: SyncGroup, tensor: torch.Tensor, root: int = 0,
              timeout_s: float | None = None) -> None:
    """Broadcast and wait until it has finished (see Broadcast.wait)."""
    start_broadcast(group, tensor, root, timeout_s).wait()


@dataclass
class Broadcast:
    """A broadcast in flight; the tensor must not be written before wait() returns."""

    group: SyncGroup
    work: Any
    tensor: torch.Tensor
    timeout_s: float | None

    def wait(self) -> None:
        """gloo's wait blocks and raises when a peer is gone (after the group's timeout).
        NCCL's only orders the current CUDA stream: it neither blocks nor raises, so a dead
        peer would stall the stream until the watchdog kills the process. On CUDA the work is
        polled until it completes, with a deadline; past it the communicator is aborted and
        TimeoutError names weight_sync.timeout_s, so the caller re-forms the session as after a gloo
        failure, and times only what really finished."""
        if not self.tensor.is_cuda:
            self.work.wait()
            return
        timeout_s = self.timeout_s if self.timeout_s is not None else 300.0
        deadline = time.monotonic() + timeout_s
        while not self.work.is_completed():
            if time.monotonic() > deadline:
                abort(self.group)
                raise TimeoutError(
                    f"weight broadcast of {self.tensor.numel() * self.tensor.element_size()} "
                    f"bytes did not finish within {timeout_s:.0f}s (weight_sync.timeout_s); a "
                    "peer of the group is gone or stuck")
            time.sleep(0.0005)
        torch.cuda.current_stream(self.tensor.device).synchronize()


def start_broadcast(group: SyncGroup, tensor: torch.Tensor, root: int = 0,
                    timeout_s: float | None = None) -> Broadcast:
    """Start a broadcast and return at once, so the next bucket can be filled meanwhile."""
    opts = dist.BroadcastOptions()
    opts.rootRank = root
    opts.rootTensor = 0
    return Broadcast(group, group.pg.broadcast([tensor], opts), tensor, timeout_s)


def abort(group: SyncGroup | None) -> None:
    """Abort a group's communicator (NCCL) before it is dropped, so that no kernel of a failed
    session keeps waiting on the GPU; gloo needs nothing."""
    nccl = getattr(dist, "ProcessGroupNCCL", None)
    if nccl is not None and isinstance(getattr(group, "pg", None), nccl):
        try:
            group.pg.abort()
        except Exception:  # noqa: BLE001 - it is being thrown away either way
            pass
