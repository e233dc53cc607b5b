"""Pipelined sends to the buffer: up to `generator.send_window` messages unacknowledged.

Every message is kept until the buffer acknowledges it, and resent when its ack does not come
within `timeout_s`. The buffer accepts each sender stream strictly in order (seq = last
accepted + 1; asyncrl/buffer/main.py), so when it answers `busy` (full, or a message after one
it refused) the outbox goes back to the oldest unacknowledged message and resends from there
(go-back-N) after a back-off: delivery stays exactly-once per (sender, incarnation, seq), and
back-pressure still holds, since nothing new is queued while the window is full.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from asyncrl import wire

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    payload: bytes
    groups: int
    sent_at: float | None = None  # None: not sent yet (or to be resent)


class BufferRejected(RuntimeError):
    """The buffer answered `rejected`: a message this build made is invalid there."""


class Outbox:
    def __init__(self, client, window: int, timeout_s: float, ready_timeout_s: float,
                 on_acked: Callable[[int, int], None], on_busy: Callable[[], None],
                 where: str, clock: Callable[[], float] = time.monotonic):
        """client: a transport.Client to the buffer's ingest port. on_acked(seq, groups) runs
        once per acknowledged message, in seq order; on_busy() once per busy answer."""
        self.client, self.window, self.timeout_s = client, window, timeout_s
        self.ready_timeout_s, self.where = ready_timeout_s, where
        self.on_acked, self.on_busy, self.clock = on_acked, on_busy, clock
        self.pending: OrderedDict[int, _Pending] = OrderedDict()  # seq -> message, in order
        self.last_reply = clock()
        self.resume_at = 0.0  # after a busy answer, no (re)send before this
        self.backoff = 0.05

    def __len__(self) -> int:
        return len(self.pending)

    def full(self) -> bool:
        return len(self.pending) >= self.window

    def put(self, seq: int, payload: bytes, groups: int) -> None:
        self.pending[seq] = _Pending(payload, groups)
        self.pump(0.0)

    def pump(self, timeout_s: float = 0.0) -> None:
        """Send what may be sent, then handle every reply waiting (or arriving within
        timeout_s). Raises TimeoutError when the buffer has been silent for
        net.ready_timeout_s with messages outstanding, BufferRejected on `rejected`."""
        now = self.clock()
        if now >= self.resume_at:
            for p in self.pending.values():
                if p.sent_at is None or now - p.sent_at > self.timeout_s:
                    self.client.send(p.payload)
                    p.sent_at = now
        while (reply := self.client.poll(timeout_s)) is not None:
            timeout_s = 0.0
            self._handle(reply)
        if self.pending and self.clock() - self.last_reply > self.ready_timeout_s:
            raise TimeoutError(f"no reply from the buffer at {self.where} for "
                               f"{self.ready_timeout_s:.0f}s with {len(self.pending)} messages "
                               "unacknowledged (net.buffer_host / net.ready_timeout_s)")

    def _handle(self, reply: bytes) -> None:
        try:
            ack = wire.decode(reply, expect=("ack",))
        except wire.MessageError as e:
            log.warning("bad reply from the buffer (%s); ignored", e)
            return
        self.last_reply = self.clock()
        seq = ack.seq
        if ack.status == "rejected":  # seq -1 when the buffer could not read the message
            raise BufferRejected(f"buffer rejected our trajectories: {ack.reason}")
        if seq not in self.pending:
            return  # the ack of a resend already acknowledged
        if ack.status == "busy":
            self.on_busy()
            self.resume_at = self.clock() + self.backoff
            self.backoff = min(1.0, self.backoff * 2)
            for later in self.pending:  # go back to the refused one: resend it and all after it
                if later >= seq:
                    self.pending[later].sent_at = None
            return
        self.backoff = 0.05
        # ok (or "duplicate": it was stored before). In order: everything before seq is in.
        for s in [s for s in self.pending if s <= seq]:
            self.on_acked(s, self.pending.pop(s).groups)
