"""Exactly-once delivery, checked from a run directory alone (`asyncrl audit RUN_DIR`).

Every group has an identity (sender, incarnation, seq, index; asyncrl/buffer/journal.py). From
the generators' ack journals (RUN_DIR/acks/*.jsonl), the buffer's journals and durable log, and
the learner's admission log, every group the buffer acknowledged must be exactly one of:
trained (once), dropped as stale, or still held by the buffer when the run ended. A group that
is none of them was lost; one trained twice was duplicated; an ack the buffer has no record of
means the buffer acknowledged something it did not keep.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from asyncrl.jsonl import read_jsonl

Ident = tuple[str, str, int, int]


@dataclass
class DeliveryAudit:
    acked: set[Ident] = field(default_factory=set)
    accepted: set[Ident] = field(default_factory=set)
    trained: list[Ident] = field(default_factory=list)
    dropped: set[Ident] = field(default_factory=set)
    remaining: set[Ident] | None = None  # None without a durable log to read it from

    @property
    def duplicates(self) -> set[Ident]:
        return {i for i, n in Counter(self.trained).items() if n > 1}

    @property
    def unacked_tail(self) -> set[Ident]:
        """Accepted groups of the last message of a stream that no ack journal holds: the
        buffer journals a message before its durable record and acks it after, so a buffer
        stopped in between (with its generator, as when a whole run is stopped) leaves such a
        row for a message nobody was told was kept. Only a stream's last message can be one:
        a stream is taken strictly in order."""
        last: dict[tuple[str, str], int] = {}
        for s, inc, seq, _ in self.accepted:
            last[(s, inc)] = max(seq, last.get((s, inc), 0))
        return {i for i in self.accepted - self.acked if i[2] == last[(i[0], i[1])]}

    @property
    def lost(self) -> set[Ident]:
        return (self.accepted - set(self.trained) - self.dropped - (self.remaining or set())
                - self.unacked_tail)

    @property
    def acked_not_accepted(self) -> set[Ident]:
        return self.acked - self.accepted

    @property
    def ok(self) -> bool:
        return not (self.duplicates or self.acked_not_accepted
                    or (self.remaining is not None and self.lost))

    def summary(self) -> str:
        held = "unknown (no durable log)" if self.remaining is None else len(self.remaining)
        return (f"acknowledged {len(self.acked)} groups, accepted {len(self.accepted)}; trained "
                f"{len(set(self.trained))}, dropped as stale {len(self.dropped)}, still held "
                f"{held}; lost {len(self.lost)}, trained twice {len(self.duplicates)}, acked but "
                f"not accepted {len(self.acked_not_accepted)}: "
                + ("exactly once" if self.ok else "NOT exactly once"))


def _expand(sender: str, incarnation: str, seq: int, n: int) -> set[Ident]:
    return {(sender, incarnation, seq, i) for i in range(n)}


def delivery_audit(run_dir: Path) -> DeliveryAudit:
    run_dir = Path(run_dir)
    a = DeliveryAudit()
    for path in sorted((run_dir / "acks").glob("*.jsonl")):
        for r in read_jsonl(path):
            a.acked |= _expand(path.stem, r["incarnation"], r["seq"], r["groups"])
    for r in read_jsonl(run_dir / "buffer" / "accepted.jsonl"):
        a.accepted |= _expand(r["sender"], r["incarnation"], r["seq"], r["groups"])
    for r in read_jsonl(run_dir / "buffer" / "dropped.jsonl"):
        a.dropped |= {tuple(g) for g in r["groups"]}
    for r in read_jsonl(run_dir / "admission.jsonl"):
        a.trained += [(g[0], g[3], g[4], g[5]) for g in r["groups"]]
    log = run_dir / "buffer" / "log.bin"
    if log.is_file():
        a.remaining = _held_at_end(log, _max_staleness(run_dir / "config.yaml"))
    return a


def _max_staleness(config: Path) -> int:
    from omegaconf import OmegaConf

    from asyncrl.config import BufferConfig

    default = BufferConfig().max_staleness
    return OmegaConf.load(config).get("buffer", {}).get("max_staleness", default) \
        if config.is_file() else default


def _held_at_end(log: Path, max_staleness: int) -> set[Ident]:
    """What the buffer held when it stopped: its recovery, run on a copy of its log."""
    from prometheus_client import CollectorRegistry

    from asyncrl.buffer.durable import DurableLog
    from asyncrl.buffer.journal import identity
    from asyncrl.buffer.main import BufferHandler
    from asyncrl.buffer.store import ReplayBuffer
    from asyncrl.metrics import BufferMetrics

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "log.bin"
        shutil.copyfile(log, copy)  # recovery cuts a torn tail: never on the run's own file
        store = ReplayBuffer(capacity_groups=0, max_staleness=max_staleness)
        handler = BufferHandler(store, BufferMetrics(CollectorRegistry()), None,
                                DurableLog(copy))
        try:
            handler.recover()
        except RuntimeError as e:  # name the run's log, not the copy
            raise RuntimeError(str(e).replace(str(copy), str(log))) from None
        handler.durable.close()
    return {identity(g) for g in store.held()}
