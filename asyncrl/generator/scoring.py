"""A generator's side of the reward service (reward.service; the role is asyncrl/reward/).

`RemoteRewards` holds finished groups while the service scores them: each message's texts go
out as one score_request (seq numbered per generator incarnation), up to reward.window
unanswered; the engine keeps sampling meanwhile. A request unanswered for reward.timeout_s
is sent again (the role may have died and restarted: nothing it had is needed), one answered
`busy` is sent again after a back-off; the first `ok` answer completes its groups and any
later answer to the same seq is ignored, so each group reaches the buffer once. Silence for
net.ready_timeout_s with requests outstanding ends the generator naming the service.

`ScoreNorm` is reward.normalize: the reward model's score as it enters the reward.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from asyncrl import wire

log = logging.getLogger("asyncrl.generator")


@dataclass
class Waiting:
    """Groups waiting for their reward-model scores, and what to do with them after."""

    payload: bytes
    groups: list  # wire.TrajectoryGroups, rewards without the reward model yet
    version: int
    first_token: float
    sent_at: float | None = None
    submitted_at: float = 0.0
    scores: list[float] = field(default_factory=list)


class RemoteRewards:
    def __init__(self, client, name: str, incarnation: str, window: int, timeout_s: float,
                 ready_timeout_s: float, where: str, m,
                 clock: Callable[[], float] = time.monotonic):
        self.client, self.name, self.incarnation = client, name, incarnation
        self.window, self.timeout_s, self.ready_timeout_s = window, timeout_s, ready_timeout_s
        self.where, self.m, self.clock = where, m, clock
        self.pending: OrderedDict[int, Waiting] = OrderedDict()
        self.seq = 0
        self.last_reply = clock()
        self.resume_at, self.backoff = 0.0, 0.05

    def __len__(self) -> int:
        return len(self.pending)

    def full(self) -> bool:
        return len(self.pending) >= self.window

    def submit(self, groups: list, version: int, first_token: float, prompts: list[str],
               completions: list[str]) -> None:
        self.seq += 1
        if not self.pending:
            self.last_reply = self.clock()  # silence counts from the first request waiting
        payload = wire.encode("score_request", version, sender=self.name,
                              incarnation=self.incarnation, seq=self.seq, prompts=prompts,
                              completions=completions)
        self.pending[self.seq] = Waiting(payload, groups, version, first_token,
                                         submitted_at=self.clock())

    def pump(self, timeout_s: float = 0.0) -> list[Waiting]:
        """Send what may be sent, take the answers waiting (or arriving within timeout_s);
        the requests answered ok, with their scores."""
        now = self.clock()
        if now >= self.resume_at:
            for w in self.pending.values():
                if w.sent_at is None or now - w.sent_at > self.timeout_s:
                    if w.sent_at is not None:
                        self.m.score_resends.inc()
                    self.client.send(w.payload)
                    w.sent_at = now
        done = []
        while (reply := self.client.poll(timeout_s)) is not None:
            timeout_s = 0.0
            w = self._handle(reply)
            if w is not None:
                done.append(w)
        if self.pending and self.clock() - self.last_reply > self.ready_timeout_s:
            raise TimeoutError(f"no answer from the reward service at {self.where} for "
                               f"{self.ready_timeout_s:.0f}s with {len(self.pending)} score "
                               "requests waiting (net.reward_host / net.ready_timeout_s)")
        return done

    def _handle(self, reply: bytes) -> Waiting | None:
        try:
            msg = wire.decode(reply, expect=("scores",))
        except wire.MessageError as e:
            self.m.messages_rejected.labels(e.reason).inc()
            log.warning("bad reply from the reward service (%s); ignored", e)
            return None
        self.last_reply = self.clock()
        w = self.pending.get(msg.seq)
        if msg.status == "rejected":  # a request this build made is invalid there: a bug
            raise RuntimeError(f"the reward service rejected score request {msg.seq}: "
                               f"{msg.reason}")
        if w is None:
            return None  # the answer to a resend already answered
        if msg.status == "busy":
            self.m.reward_busy.inc()
            self.resume_at = self.clock() + self.backoff
            self.backoff = min(1.0, self.backoff * 2)
            w.sent_at = None
            return None
        expected = sum(len(g.completions) for g in w.groups)
        if len(msg.scores) != expected:
            self.m.messages_rejected.labels("bad_value").inc()
            log.warning("the reward service answered request %d with %d scores for %d texts; "
                        "asking again", msg.seq, len(msg.scores), expected)
            w.sent_at = None
            return None
        self.backoff = 0.05
        w.scores = list(msg.scores)
        self.m.score_seconds.observe(self.clock() - w.submitted_at)
        return self.pending.pop(msg.seq)


class ScoreNorm:
    """reward.normalize: `none`, `running` (Welford mean and standard deviation of every
    score seen so far, this batch included) or `group` (each group's own)."""

    def __init__(self, mode: str):
        self.mode = mode
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def __call__(self, scores: list[float]) -> list[float]:
        """One group's scores, normalised."""
        if self.mode == "none" or not scores:
            return list(scores)
        if self.mode == "group":
            mean = sum(scores) / len(scores)
            std = math.sqrt(sum((x - mean) ** 2 for x in scores) / len(scores))
        else:
            for x in scores:
                self.n += 1
                d = x - self.mean
                self.mean += d / self.n
                self.m2 += d * (x - self.mean)
            mean, std = self.mean, math.sqrt(self.m2 / self.n)
        return [(x - mean) / (std + 1e-6) for x in scores]
