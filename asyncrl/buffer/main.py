"""Buffer process: receive trajectories from generators, hand batches to the learner.

One thread owns both sockets (ROUTERs on net.buffer_ingest_port for generators and
net.buffer_learner_port for learner ranks) and polls them in turn. Every frame is validated;
a bad one gets an error/rejected reply and a counter by reason, never a crash. A full buffer
answers "busy" and the generator resends later: nothing is dropped except trajectories older
than buffer.max_staleness, which are counted.

Delivery is exactly-once per (sender, incarnation, seq): a resent message (its ack was lost)
is acknowledged again but not stored twice. Left out here: a durable log (issue 4).

Run (normally started by `asyncrl run`):
    python -m asyncrl buffer --config RUN_DIR/config.yaml
"""

from __future__ import annotations

import logging

from asyncrl import wire
from asyncrl.buffer.store import ReplayBuffer
from asyncrl.config import RunConfig

log = logging.getLogger("asyncrl.buffer")


def run(cfg: RunConfig, vocab_size: int | None = None) -> None:
    from prometheus_client import CollectorRegistry

    from asyncrl import metrics, transport

    registry = CollectorRegistry()
    m = metrics.BufferMetrics(registry)
    metrics.serve(registry, cfg.net.bind_host, cfg.net.buffer_metrics_port)
    store = ReplayBuffer(cfg.admit_groups, cfg.buffer.max_staleness)
    ctx = transport.context()
    ingest = transport.Server(ctx, cfg.net.bind_host, cfg.net.buffer_ingest_port)
    learner = transport.Server(ctx, cfg.net.bind_host, cfg.net.buffer_learner_port)
    log.info("buffer listening: generators on %d, learner on %d, metrics on %d",
             cfg.net.buffer_ingest_port, cfg.net.buffer_learner_port, cfg.net.buffer_metrics_port)
    handler = BufferHandler(store, m, vocab_size)
    while True:
        for server in transport.poll_servers([ingest, learner], timeout_s=1.0):
            got = server.recv()
            if got is None:
                m.rejected.labels("bad_framing").inc()
                continue
            ident, frame = got
            reply = (handler.on_trajectories(frame) if server is ingest
                     else handler.on_batch_request(frame))
            server.send(ident, reply)


class BufferHandler:
    """Frame in, reply frame out. Kept apart from the sockets so tests can drive it directly."""

    def __init__(self, store: ReplayBuffer, m, vocab_size: int | None):
        self.store, self.m, self.vocab_size = store, m, vocab_size
        # (sender, incarnation) -> highest seq accepted. A generator resends a message whose
        # ack it did not get; acking the resend without storing it again makes delivery
        # exactly-once per (sender, incarnation, seq).
        self.accepted_seq: dict[tuple[str, str], int] = {}

    def _reject(self, e: wire.MessageError, **reply) -> bytes:
        self.m.rejected.labels(e.reason).inc()
        log.warning("rejected frame: %s", e)
        return wire.encode(**reply)

    def on_trajectories(self, frame: bytes) -> bytes:
        version = self.store.learner_version
        try:
            msg = wire.decode(frame, expect=("trajectories",), vocab_size=self.vocab_size)
        except wire.MessageError as e:
            return self._reject(e, kind="ack", policy_version=version, seq=-1,
                                status="rejected", reason=str(e)[:200])
        key = (msg["sender"], msg["incarnation"])
        if msg["seq"] <= self.accepted_seq.get(key, -1):
            self.m.duplicates.inc()
            return wire.encode("ack", version, seq=msg["seq"], status="ok", reason="duplicate")
        groups = msg["groups"]
        if not self.store.add(groups):
            self.m.busy.inc()
            return wire.encode("ack", version, seq=msg["seq"], status="busy", reason="full")
        self.accepted_seq[key] = msg["seq"]
        self.m.received.inc(sum(len(g.completions) for g in groups))
        self._occupancy()
        return wire.encode("ack", version, seq=msg["seq"], status="ok", reason="")

    def on_batch_request(self, frame: bytes) -> bytes:
        try:
            msg = wire.decode(frame, expect=("batch_request",))
        except wire.MessageError as e:
            return self._reject(e, kind="error", policy_version=self.store.learner_version,
                                reason=str(e)[:200])
        res = self.store.take(msg["num_groups"], msg["policy_version"])
        self.m.learner_version.set(self.store.learner_version)
        if res.stale_dropped_trajectories:
            self.m.stale_dropped.inc(res.stale_dropped_trajectories)
        self.m.served.inc(sum(len(g.completions) for g in res.groups))
        self._occupancy()
        return wire.encode("batch", self.store.learner_version,
                           status="ok" if res.groups else "not_ready", groups=res.groups,
                           stale_dropped_total=self.store.stale_dropped_trajectories_total)

    def _occupancy(self) -> None:
        self.m.occupancy.set(len(self.store))
        self.m.occupancy_traj.set(self.store.num_trajectories)
