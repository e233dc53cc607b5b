"""What a long-running role does with frames it refuses, beyond counting them: log them at a
rate that a flood cannot raise, and bound what a peer can make it remember.

An authenticated peer can still send hostile frames (a compromised host keeps its keys). Each
refusal is counted by reason in Prometheus, which costs nothing per frame; a log line per
frame costs disk (60 s of hostile frames wrote 15 MB to buffer.log). `RefusalLog` logs the
first refusal of each reason and peer, then one line per `interval_s` saying how many more
came. `NewStreams` bounds the sender incarnations (restarts) a peer may open in a window: each
one is a stream the buffer remembers for exactly-once delivery, and a new session the learner
forms for weight sync, so an unbounded number would grow memory and stall the pushes.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

MAX_KEYS = 1024  # (reason, peer) pairs tracked; past it, peers share one line per reason


def speaks_for(role: str | None, sender: str) -> bool:
    """Whether a message's `sender` is the role whose CURVE key sent it (None: net.curve off,
    nothing to check). Learner ranks send as learner<r> under the one learner role."""
    return role is None or sender == role or (
        role == "learner" and sender.startswith("learner") and sender[7:].isdigit())


class RefusalLog:
    """Rate-limited logging of refused frames, per (reason, peer)."""

    def __init__(self, logger: logging.Logger, what: str, interval_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.log, self.what, self.interval_s, self.clock = logger, what, interval_s, clock
        self._seen: dict[tuple[str, str], list] = {}  # key -> [last logged at, suppressed]

    def refused(self, reason: str, peer: str | None, detail: str) -> None:
        peer = peer or "unauthenticated"
        key = (reason, peer) if len(self._seen) < MAX_KEYS else (reason, "*")
        now = self.clock()
        entry = self._seen.get(key)
        if entry is None:
            self._seen[key] = [now, 0]
            self.log.warning("%s: refused a frame from %s (%s): %s; more of these are counted "
                             "and logged once a minute", self.what, peer, reason, detail)
            return
        entry[1] += 1
        if now - entry[0] >= self.interval_s:
            self.log.warning("%s: refused %d more frames from %s (%s) in %.0fs; the last: %s",
                             self.what, entry[1], peer, reason, now - entry[0], detail)
            entry[0], entry[1] = now, 0


class NewStreams:
    """At most `limit` new incarnations per sender within `window_s`: a real restart takes
    seconds (an engine starts) and `asyncrl run` spaces them out, a flood takes microseconds."""

    def __init__(self, limit: int = 16, window_s: float = 600.0,
                 clock: Callable[[], float] = time.monotonic):
        self.limit, self.window_s, self.clock = limit, window_s, clock
        self._opened: dict[str, deque] = {}

    def allows(self, sender: str) -> bool:
        """Whether `sender` may open one more incarnation now."""
        now = self.clock()
        q = self._opened.setdefault(sender, deque())
        while q and now - q[0] > self.window_s:
            q.popleft()
        return len(q) < self.limit

    def opened(self, sender: str) -> None:
        """`sender` opened an incarnation (a stream was stored, a member recorded): only what
        took effect counts, so a generator resending its first message to a full buffer
        does not use up its allowance."""
        self._opened.setdefault(sender, deque()).append(self.clock())
