"""Buffer process: receive trajectories from generators, hand batches to the learner.

One thread owns both sockets (ROUTERs on net.buffer_ingest_port for generators and
net.buffer_learner_port for learner ranks) and polls them in turn. Every frame is validated;
a bad one gets an error/rejected reply and a counter by reason, never a crash. A full buffer
answers "busy" and the generator resends later: nothing is dropped except trajectories older
than buffer.max_staleness, which are counted.

Delivery is exactly-once per (sender, incarnation, seq): a resent message (its ack was lost)
is acknowledged again but not stored twice. With buffer.durable (the default) every accepted
message and every batch handed out is in RUN_DIR/buffer/log.bin before the reply goes out, so
a restarted buffer holds exactly what it had acknowledged and not yet handed out.

Run (normally started by `asyncrl run`):
    python -m asyncrl buffer --config RUN_DIR/config.yaml
"""

from __future__ import annotations

import logging
import struct
import time
from pathlib import Path

import msgpack

from asyncrl import wire
from asyncrl.buffer.durable import ADD, TAKE
from asyncrl.buffer.journal import DeliveryJournal
from asyncrl.buffer.store import ReplayBuffer, TakeResult
from asyncrl.config import RunConfig
from asyncrl.guard import NewStreams, RefusalLog, speaks_for

log = logging.getLogger("asyncrl.buffer")


def run(cfg: RunConfig, vocab_size: int | None = None) -> None:
    from prometheus_client import CollectorRegistry

    from asyncrl import metrics, transport

    registry = CollectorRegistry()
    m = metrics.BufferMetrics(registry)
    metrics.serve(registry, cfg.net.bind_host, cfg.net.buffer_metrics_port)
    store = ReplayBuffer(cfg.admit_groups, cfg.buffer.max_staleness)
    ctx = transport.context()
    keys = transport.keys_for(cfg.net, cfg.run_dir, "buffer")

    def refused(port: int, reason: str) -> None:
        m.auth_failures.labels(str(port), reason).inc()

    # Each port admits the roles that belong on it: a generator's key takes no batches.
    ingest, learner, beats = (
        transport.Server(ctx, cfg.net.bind_host, port, keys, refused, allow)
        for port, allow in ((cfg.net.buffer_ingest_port, (transport.GENERATORS,)),
                            (cfg.net.buffer_learner_port, (transport.LEARNER,)),
                            (cfg.net.heartbeat_port, (transport.GENERATORS, transport.LEARNER,
                                                      transport.EVALUATOR))))
    refusals = RefusalLog(log, "buffer")
    liveness = Liveness(cfg.net.heartbeat_timeout_s, m, refusals)
    log.info("buffer listening: generators on %d, learner on %d, metrics on %d",
             cfg.net.buffer_ingest_port, cfg.net.buffer_learner_port, cfg.net.buffer_metrics_port)
    durable = None
    if cfg.buffer.durable:
        from asyncrl.buffer.durable import DurableLog

        durable = DurableLog(Path(cfg.run_dir) / "buffer" / "log.bin", cfg.buffer.fsync)
    journal = DeliveryJournal(Path(cfg.run_dir) / "buffer") if cfg.run_dir else None
    handler = BufferHandler(store, m, vocab_size, durable, journal,
                            max_version=cfg.learner.total_steps, refusals=refusals)
    if durable is not None:
        n = handler.recover()
        log.info("recovered %d groups from %s", n, durable.path)
    serve(handler, ingest, learner, beats, liveness)


def serve(handler: BufferHandler, ingest, learner=None, beats=None,
          liveness: Liveness | None = None) -> None:
    """The buffer's request loop, forever: trajectories from the `ingest` server, batch
    requests from `learner`, heartbeats from `beats` for `liveness` (`learner` and `beats` may
    be None), each request answered by `handler` before the next is read."""
    from asyncrl import transport

    servers = [s for s in (ingest, learner, beats) if s is not None]
    while True:
        for server in transport.poll_servers(servers, timeout_s=0.5):
            got = server.recv()
            if got is None:
                handler.m.rejected.labels("bad_framing").inc()
                continue
            if server is beats:
                liveness.on_heartbeat(got.payload, got.role)
                continue
            reply = (handler.on_trajectories(got.payload, got.role) if server is ingest
                     else handler.on_batch_request(got.payload, got.role))
            server.send(got.ident, reply)
        if liveness is not None:
            liveness.check()


class Liveness:
    """Heartbeats from generators and learner ranks; a peer silent for more than `timeout_s`
    is reported (a warning, and the metrics) within timeout_s + the 0.5 s poll."""

    def __init__(self, timeout_s: float, m, refusals: RefusalLog | None = None):
        self.timeout_s, self.m = timeout_s, m
        self.refusals = refusals or RefusalLog(log, "buffer heartbeats")
        self.last_seen: dict[str, float] = {}
        self.silent: set[str] = set()

    def on_heartbeat(self, frame: bytes, role: str | None = None) -> None:
        try:
            msg = wire.decode(frame, expect=("heartbeat",))
            _check_sender(msg.sender, role)
        except wire.MessageError as e:
            self.m.rejected.labels(e.reason).inc()
            self.refusals.refused(e.reason, role, str(e))
            return
        if len(self.last_seen) >= 1024 and msg.sender not in self.last_seen:
            return  # bound the label set
        self.last_seen[msg.sender] = time.monotonic()
        if msg.sender in self.silent:
            self.silent.discard(msg.sender)
            log.warning("peer %s is alive again", msg.sender)

    def check(self) -> None:
        now = time.monotonic()
        for peer, seen in self.last_seen.items():
            age = now - seen
            self.m.peer_age.labels(peer).set(age)
            if age > self.timeout_s and peer not in self.silent:
                self.silent.add(peer)
                log.error("peer %s silent for %.1fs (frozen or dead?); net.heartbeat_timeout_s"
                          "=%.1f", peer, age, self.timeout_s)
        self.m.peers_silent.set(len(self.silent))


class BufferHandler:
    """Frame in, reply frame out. Kept apart from the sockets so tests can drive it directly."""

    def __init__(self, store: ReplayBuffer, m, vocab_size: int | None, durable=None,
                 journal: DeliveryJournal | None = None, max_version: int = wire.MAX_VERSION,
                 refusals: RefusalLog | None = None):
        """max_version: the newest policy version a learner can ask at (learner.total_steps);
        a batch_request beyond it would drop every group as stale, so it is refused."""
        self.store, self.m, self.vocab_size, self.durable = store, m, vocab_size, durable
        self.journal, self.max_version = journal, max_version
        self.refusals = refusals or RefusalLog(log, "buffer")
        self.streams = NewStreams()
        # (sender, incarnation) -> highest seq accepted. A generator resends a message whose
        # ack it did not get; acking the resend without storing it again makes delivery
        # exactly-once per (sender, incarnation, seq). A known stream is accepted strictly in
        # order (seq = last + 1): a generator pipelining several messages resends from the
        # first one refused (asyncrl/generator/outbox.py), and a later one accepted before it
        # would make the refused one look like a duplicate. A stream starts at seq 1; only a
        # buffer without a durable log, which forgets the streams when it restarts, takes a
        # stream it does not know at any seq.
        self.accepted_seq: dict[tuple[str, str], int] = {}

    def _reject(self, e: wire.MessageError, role: str | None, **reply) -> bytes:
        self.m.rejected.labels(e.reason).inc()
        self.refusals.refused(e.reason, role, str(e))
        return wire.encode(**reply)

    def on_trajectories(self, frame: bytes, role: str | None = None) -> bytes:
        """role: the generator the frame's CURVE key authenticated (None with net.curve off)."""
        version = self.store.learner_version
        try:
            msg = wire.decode(frame, expect=("trajectories",), vocab_size=self.vocab_size)
            _check_sender(msg.sender, role)
            key = (msg.sender, msg.incarnation)
            if key not in self.accepted_seq and not self.streams.allows(msg.sender):
                raise wire.MessageError("too_many_incarnations", (
                    f"{msg.sender} opened more than {self.streams.limit} incarnations in "
                    f"{self.streams.window_s:.0f}s"))
        except wire.MessageError as e:
            return self._reject(e, role, kind="ack", policy_version=version, seq=-1,
                                status="rejected", reason=str(e)[:200])
        last = self.accepted_seq.get(key)
        if last is None:
            last = 0 if self.durable is not None else msg.seq - 1
        if msg.seq <= last:
            self.m.duplicates.inc()
            return wire.encode("ack", version, seq=msg.seq, status="ok", reason="duplicate")
        if msg.seq != last + 1:
            self.m.busy.inc()
            return wire.encode("ack", version, seq=msg.seq, status="busy",
                               reason=f"out of order: expected seq {last + 1}")
        groups = _stamp(msg)
        if not self.store.add(groups):
            self.m.busy.inc()
            return wire.encode("ack", version, seq=msg.seq, status="busy", reason="full")
        if key not in self.accepted_seq:
            self.streams.opened(msg.sender)
        self.accepted_seq[key] = msg.seq
        if self.journal is not None:  # before the durable record: see buffer/journal.py
            self.journal.accepted(msg.sender, msg.incarnation, msg.seq, len(groups))
        if self.durable is not None:
            self.durable.append(ADD, frame)
        self.m.received.inc(sum(len(g.completions) for g in groups))
        self._occupancy()
        return wire.encode("ack", version, seq=msg.seq, status="ok", reason="")

    def on_batch_request(self, frame: bytes, role: str | None = None) -> bytes:
        try:
            msg = wire.decode(frame, expect=("batch_request",))
            if msg.policy_version > self.max_version:
                raise wire.MessageError("version_ahead", (
                    f"batch_request at policy version {msg.policy_version}: the learner "
                    f"trains {self.max_version} steps"))
        except wire.MessageError as e:
            return self._reject(e, role, kind="error",
                                policy_version=self.store.learner_version, reason=str(e)[:200])
        res = self.take(msg.num_groups, msg.policy_version)
        return wire.encode("batch", self.store.learner_version,
                           status="ok" if res.groups else "not_ready", groups=res.groups,
                           stale_dropped_total=self.store.stale_dropped_trajectories_total)

    def take(self, num_groups: int, learner_version: int) -> TakeResult:
        """Hand out the oldest `num_groups` usable groups (or none), with what that drops,
        journalled and in the durable log before the caller replies."""
        res = self.store.take(num_groups, learner_version)
        if self.journal is not None:
            self.journal.dropped(res.dropped)
        if self.durable is not None and (res.groups or res.stale_dropped_groups):
            self.durable.append(TAKE, struct.pack("<IQ", num_groups if res.groups else 0,
                                                  learner_version))
            if len(self.store) == 0:  # nothing left to lose: keep only the dedup table
                self.durable.compact(msgpack.packb(
                    [[s, i, q] for (s, i), q in self.accepted_seq.items()]))
        self.m.learner_version.set(self.store.learner_version)
        if res.stale_dropped_trajectories:
            self.m.stale_dropped.inc(res.stale_dropped_trajectories)
        self.m.served.inc(sum(len(g.completions) for g in res.groups))
        self._occupancy()
        return res

    def recover(self) -> int:
        """Rebuild the store and dedup table from the durable log; returns groups held."""
        for kind, payload in self.durable.replay():
            if kind == ADD:
                try:
                    msg = wire.decode(payload)
                except wire.MessageError as e:  # checksummed, so not torn: another version
                    raise RuntimeError(
                        f"durable log {self.durable.path}: a record does not decode ({e}); "
                        "it was written by another asyncrl version. Drain it with that "
                        "version, or move the buffer directory aside to start empty") from None
                self.store.add(_stamp(msg), force=True)
                self.accepted_seq[(msg.sender, msg.incarnation)] = msg.seq
            elif kind == TAKE:
                n, version = struct.unpack("<IQ", payload)
                self.store.take(n, version) if n else self.store.drop_stale(version)
            else:
                self.accepted_seq = {(s, i): q for s, i, q in msgpack.unpackb(payload)}
        self.m.recovered.inc(len(self.store))
        self._occupancy()
        return len(self.store)

    def _occupancy(self) -> None:
        self.m.occupancy.set(len(self.store))
        self.m.occupancy_traj.set(self.store.num_trajectories)


def _check_sender(sender: str, role: str | None) -> None:
    """A message's sender must be the role its key authenticated: one generator's key cannot
    speak for another, nor for the learner."""
    if speaks_for(role, sender):
        return
    raise wire.MessageError("sender_mismatch", f"sender {sender!r} from a peer holding "
                                               f"{role}'s key")


def _stamp(msg: wire.Trajectories) -> list:
    """The groups of a trajectories message, each stamped with its identity."""
    for i, g in enumerate(msg.groups):
        g.generator, g.incarnation, g.seq, g.index = (msg.sender, msg.incarnation,
                                                      msg.seq, i)
    return msg.groups
