"""The learner-side sender (rank 0 only): announce, broadcast, wait until every generator loaded.

Control messages go over ZeroMQ (a ROUTER on net.sync_control_port that generators connect
to); tensor bytes go over the sync process group. The order is fixed: weights_update to every
generator, then the broadcasts (sorted by dtype), then a weights_loaded from each generator.
"""

from __future__ import annotations

import logging
import time

import torch

from asyncrl import wire
from asyncrl.sync import group, weights
from asyncrl.transport import Server

log = logging.getLogger(__name__)


class WeightSender:
    def __init__(self, server: Server, host: str, store_port: int, num_generators: int,
                 backend: str, timeout_s: float, ready_timeout_s: float):
        self.server = server
        self.num_generators = num_generators
        self.timeout_s = timeout_s
        self._bufs: dict[str, torch.Tensor] | None = None  # refilled in place on every push
        self.peers = self._await_hellos(ready_timeout_s)
        self.pg = group.init_group(host, store_port, 0, num_generators + 1, backend, timeout_s,
                                   prefix="asyncrl/sync/0")

    def _await_hellos(self, timeout_s: float) -> dict[str, bytes]:
        """sender name -> ZeroMQ identity, for every generator."""
        peers: dict[str, bytes] = {}
        deadline = time.monotonic() + timeout_s
        while len(peers) < self.num_generators:
            msg = self._recv_until(deadline, "generator_hello")
            if msg is None:
                raise TimeoutError(
                    f"{len(peers)}/{self.num_generators} generators registered for weight sync "
                    f"within {timeout_s:.0f}s (have: {sorted(peers) or 'none'}). Are they running "
                    "and pointed at net.learner_host? The limit is net.ready_timeout_s")
            ident, m = msg
            peers[m["sender"]] = ident
            log.info("generator %s registered for weight sync (sync rank %d)", m["sender"],
                     m["sync_rank"])
        return peers

    def _recv_until(self, deadline: float, kind: str) -> tuple[bytes, dict] | None:
        while (left := deadline - time.monotonic()) > 0:
            if not self.server.sock.poll(int(min(left, 1.0) * 1000)):
                continue
            got = self.server.recv()
            if got is None:
                continue
            try:
                return got[0], wire.decode(got[1], expect=(kind,))
            except wire.MessageError as e:
                log.warning("sync control: rejected frame (%s)", e)
        return None

    def push(self, model: torch.nn.Module, version: int) -> tuple[float, int]:
        """Broadcast the model's weights as `version`. Returns (seconds, bytes)."""
        t0 = time.perf_counter()
        named = weights.sendable(model)
        bufs = self._bufs = weights.pack(named, self._bufs)
        announce = wire.encode("weights_update", version, tensors=weights.specs_of(named))
        for ident in self.peers.values():
            self.server.send(ident, announce)
        for dt in sorted(bufs):
            group.broadcast(self.pg, bufs[dt], root=0)
        waiting = set(self.peers)
        deadline = time.monotonic() + self.timeout_s
        while waiting:
            msg = self._recv_until(deadline, "weights_loaded")
            if msg is None:
                raise TimeoutError(
                    f"weight sync to version {version}: generators {sorted(waiting)} did not "
                    f"confirm loading within {self.timeout_s:.0f}s (sync.timeout_s)")
            if msg[1]["policy_version"] == version:
                waiting.discard(msg[1]["sender"])
        return time.perf_counter() - t0, weights.nbytes(bufs)
