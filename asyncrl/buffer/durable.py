"""The buffer's durable log: what it acknowledged survives a crash of the buffer process.

An append-only file of records `u32 length | u32 crc32 | u8 kind | payload`, written and
flushed to the OS before the buffer replies (so a killed process loses nothing it acked;
`buffer.fsync` also survives a machine crash, at ~1 ms per message). Replaying the records
in order rebuilds the store exactly: ADD holds the accepted `trajectories` frame, TAKE the
size and learner version of a batch handed out (stale drops follow from the versions), and
SNAPSHOT the dedup table written when the log is compacted. A torn or corrupt tail (the
process died mid-write) fails its checksum; replay stops there and truncates it.

An ADD payload is a sealed wire frame, `MAGIC | crc32(rest) | rest`, whose checksum the buffer
has verified before accepting it. Its record reuses that checksum instead of hashing the frame
a second time (0.7 ms per MB of trajectories); replay checks it over the rest of the frame and
checks that the frame's header agrees.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

from asyncrl.wire import MAGIC

log = logging.getLogger(__name__)

ADD, TAKE, SNAPSHOT = 1, 2, 3
_HEAD = struct.Struct("<IIB")


class DurableLog:
    def __init__(self, path: Path, fsync: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.torn_records = 0
        self._f = self.path.open("ab")

    def append(self, kind: int, payload: bytes) -> None:
        crc = (struct.unpack_from("<I", payload, 4)[0] if kind == ADD  # verified on receipt
               else zlib.crc32(payload))
        self._f.write(_HEAD.pack(len(payload), crc, kind))
        self._f.write(payload)  # not head + payload: that copies a 1 MB frame
        self._f.flush()
        if self.fsync:
            os.fsync(self._f.fileno())

    def replay(self) -> Iterator[tuple[int, bytes]]:
        """Every intact record in order; a bad tail is cut off (and counted)."""
        data = self.path.read_bytes() if self.path.exists() else b""
        off = 0
        while off < len(data):
            if off + _HEAD.size > len(data):
                break
            n, crc, kind = _HEAD.unpack_from(data, off)
            payload = data[off + _HEAD.size : off + _HEAD.size + n]
            intact = len(payload) == n and kind in (ADD, TAKE, SNAPSHOT)
            if not (intact and _intact(kind, payload, crc)):
                break
            yield kind, payload
            off += _HEAD.size + n
        if off < len(data):
            self.torn_records += 1
            log.warning("durable log %s: %d bytes of torn or corrupt tail cut off at offset %d",
                        self.path, len(data) - off, off)
            self._f.close()
            with self.path.open("r+b") as f:
                f.truncate(off)
            self._f = self.path.open("ab")

    def compact(self, snapshot: bytes) -> None:
        """Start the log afresh with one SNAPSHOT record (when the store is empty)."""
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("wb") as f:
            f.write(_HEAD.pack(len(snapshot), zlib.crc32(snapshot), SNAPSHOT) + snapshot)
            f.flush()
            os.fsync(f.fileno())
        self._f.close()
        os.replace(tmp, self.path)
        self._f = self.path.open("ab")

    def close(self) -> None:
        self._f.close()


def _intact(kind: int, payload: bytes, crc: int) -> bool:
    if kind == ADD and (len(payload) >= 8 and payload[:4] == MAGIC
                        and struct.unpack_from("<I", payload, 4)[0] == crc
                        and zlib.crc32(memoryview(payload)[8:]) == crc):
        return True
    # Every other record, and ADD records of logs written before the reuse: an intact old
    # record must reach the decoder (which names the version), not be cut off as torn.
    return zlib.crc32(payload) == crc
