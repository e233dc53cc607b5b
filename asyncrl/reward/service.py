"""The reward role's logic, apart from its sockets (main.py) so tests drive it directly.

Every request is checked (a frame that is not a valid score_request, a sender that is not the
role its CURVE key authenticated, prompts and completions of different lengths) and refused
with a `scores` reply of status rejected and a counter by reason, never a crash. A valid
request's texts join the queue; past reward.max_queue texts the request is answered `busy`
and the generator sends it again later (back-pressure). `next_batch` takes whole requests
from the queue, oldest first, across generators, up to reward.max_batch texts (at least one
request); `score` scores them in one call and returns each request's reply.

Nothing is kept for a request once it is answered: a generator resends a request whose
answer it did not get (a restarted role, a lost reply), and the role scores it again, the
same texts to the same scores. The generator takes the first answer to each of its requests
and ignores the others, so every group is scored into the buffer once.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass

from asyncrl import wire
from asyncrl.guard import RefusalLog, speaks_for

log = logging.getLogger("asyncrl.reward")


@dataclass
class Job:
    ident: bytes
    seq: int
    version: int
    prompts: list[str]
    completions: list[str]
    queued_at: float


class RewardService:
    def __init__(self, scorer, m, max_batch: int, max_queue: int, clock=time.monotonic):
        self.scorer, self.m, self.max_batch, self.max_queue = scorer, m, max_batch, max_queue
        self.queue: deque[Job] = deque()
        self.queued_texts = 0
        self.clock = clock
        self.refusals = RefusalLog(log, "reward")

    def take(self, ident: bytes, payload: bytes, role: str | None) -> bytes | None:
        """A received frame: queued (None), or the reply to send now (rejected or busy)."""
        try:
            msg = wire.decode(payload, expect=("score_request",))
        except wire.MessageError as e:
            return self._refuse(e.reason, role, str(e), -1)
        if not speaks_for(role, msg.sender):
            return self._refuse("impersonation", role, f"sender {msg.sender!r} is not the "
                                f"role {role!r} that its key authenticates", msg.seq)
        if len(msg.prompts) != len(msg.completions):
            return self._refuse("bad_value", role, f"{len(msg.prompts)} prompts and "
                                f"{len(msg.completions)} completions", msg.seq)
        n = len(msg.prompts)
        if self.queue and self.queued_texts + n > self.max_queue:
            self.m.requests.labels("busy").inc()
            return wire.encode("scores", msg.policy_version, seq=msg.seq, status="busy",
                               reason=f"{self.queued_texts} texts queued (reward.max_queue="
                                      f"{self.max_queue})", scores=[])
        self.queue.append(Job(ident, msg.seq, msg.policy_version, msg.prompts, msg.completions,
                              self.clock()))
        self.queued_texts += n
        self.m.queue_texts.set(self.queued_texts)
        return None

    def _refuse(self, reason: str, role: str | None, detail: str, seq: int) -> bytes:
        self.m.rejected.labels(reason).inc()
        self.m.requests.labels("rejected").inc()
        self.refusals.refused(reason, role, detail)
        return wire.encode("scores", 0, seq=seq, status="rejected", reason=detail[:1000],
                           scores=[])

    def next_batch(self) -> list[Job]:
        """Whole requests, oldest first, up to max_batch texts (one request at least)."""
        jobs, n = [], 0
        while self.queue and (not jobs or n + len(self.queue[0].prompts) <= self.max_batch):
            job = self.queue.popleft()
            jobs.append(job)
            n += len(job.prompts)
        self.queued_texts -= n
        self.m.queue_texts.set(self.queued_texts)
        return jobs

    def score(self, jobs: list[Job]) -> list[tuple[bytes, bytes]]:
        """Score a batch in one call: (ident, reply) per request."""
        prompts = [p for j in jobs for p in j.prompts]
        completions = [c for j in jobs for c in j.completions]
        t0 = self.clock()
        scores = self.scorer.score(prompts, completions) if prompts else []
        seconds = self.clock() - t0
        self.m.batch_seconds.observe(seconds)
        self.m.batch_texts.observe(len(prompts))
        self.m.scored.inc(len(prompts))
        bad = sum(not math.isfinite(x) for x in scores)
        if bad:  # the model's fault, not the request's: scored 0, counted, logged
            self.m.rejected.labels("nonfinite_score").inc(bad)
            self.refusals.refused("nonfinite_score", None, f"{bad} scores not finite")
            scores = [x if math.isfinite(x) else 0.0 for x in scores]
        replies, at = [], 0
        for j in jobs:
            mine = [float(x) for x in scores[at:at + len(j.prompts)]]
            at += len(j.prompts)
            self.m.requests.labels("ok").inc()
            self.m.wait_seconds.observe(t0 - j.queued_at)
            replies.append((j.ident, wire.encode("scores", j.version, seq=j.seq, status="ok",
                                                 reason="", scores=mine)))
        return replies
