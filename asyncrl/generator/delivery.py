"""A generator's delivery: scoring finished work and getting it into the buffer exactly once.

`Delivery.send` scores finished SampleGroups (`Scorer`: task.rewards and, optionally, a
reward model; each completion carries its reward and the parts it was made of), builds one
trajectories message of them and hands it to the outbox (asyncrl/generator/outbox.py: up to
generator.send_window unacknowledged, resent until acknowledged). `send_blocking` is batch
generation's: one message, sent until the buffer acks it, serving weight sync and evaluations
while a full buffer makes it wait. Every acknowledged message is journaled in
RUN_DIR/acks/<name>.jsonl (read by asyncrl.audit).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from asyncrl import wire
from asyncrl.config import RunConfig
from asyncrl.generator.engine import Sample
from asyncrl.generator.episode import EpisodeGroup
from asyncrl.generator.outbox import Outbox
from asyncrl.rewards import combine

log = logging.getLogger("asyncrl.generator")


class Delivery:
    def __init__(self, cfg: RunConfig, name: str, incarnation: str, scorer: Scorer,
                 problems: dict, buffer, m, stats, acks_path: Path, remote=None):
        """remote: a RemoteRewards (asyncrl/generator/scoring.py) with reward.service, whose
        scores a group waits for before it is queued for the buffer."""
        self.cfg, self.name, self.incarnation = cfg, name, incarnation
        self.scorer, self.problems, self.buffer, self.m, self.stats = (scorer, problems, buffer,
                                                                        m, stats)
        acks_path.parent.mkdir(parents=True, exist_ok=True)
        self.acks = acks_path.open("a")
        self.seq = 0
        self.first_token: dict[int, float] = {}  # seq -> earliest first token of its groups
        self.completions: dict[int, int] = {}  # seq -> completions in it
        net = cfg.net
        self.remote = remote
        self.outbox = Outbox(buffer, cfg.generator.send_window,
                             min(10.0, net.ready_timeout_s), net.ready_timeout_s,
                             self._on_acked, m.busy_retries.inc,
                             f"{net.buffer_host}:{net.buffer_ingest_port}")

    # ------------------------------------------------------------------ streaming

    def full(self) -> bool:
        """The send window (or the reward service's) is full: finished groups wait
        (back-pressure)."""
        return self.outbox.full() or (self.remote is not None and self.remote.full())

    def send(self, units: list, version: int) -> None:
        """Score finished units and queue them as one message: a SampleGroup is scored here
        (task.rewards; with reward.service the reward model's score comes later, and the
        message is queued when it has), an EpisodeGroup was scored by its environment."""
        first_token = min(u.first_token_at or u.started_at for u in units)
        if self.remote is not None:
            texts = [self.scorer.texts(u.seqs) for u in units]
            groups = [self.scorer.stream_group(self.problems[u.key], u, self.name, t)
                      for u, t in zip(units, texts)]
            self._submit([u.key for u in units], groups, texts, version, first_token)
            self.pump(0.0)
            return
        groups = [u.trajectory(self.name) if isinstance(u, EpisodeGroup) else
                  self.scorer.stream_group(self.problems[u.key], u, self.name) for u in units]
        for u in units:
            if isinstance(u, EpisodeGroup):
                self._count_episodes(u)
        self._queue(groups, version, first_token)

    def _queue(self, groups: list, version: int, first_token: float) -> None:
        seq = self._message_seq(groups)
        self.first_token[seq] = first_token
        self.completions[seq] = sum(len(g.completions) for g in groups)
        self.outbox.put(seq, self._encode(groups, version, seq), len(groups))

    def _submit(self, keys: list, groups: list, texts: list[list[str]], version: int,
                first_token: float) -> None:
        """Groups (rule rewards in) to the reward service: each completion's text with its
        problem's prompt."""
        self.remote.submit(groups, version, first_token,
                           [self.problems[k].prompt for k, t in zip(keys, texts) for _ in t],
                           [x for t in texts for x in t])

    def _with_scores(self, w) -> list:
        """A request's groups with the reward service's scores in (in completion order)."""
        at = 0
        for g in w.groups:
            self.scorer.add_model_scores(g, w.scores[at:at + len(g.completions)])
            at += len(g.completions)
        return w.groups

    def _scored(self, timeout_s: float) -> None:
        """The groups whose reward-model scores came: scored, and queued for the buffer."""
        for w in self.remote.pump(timeout_s):
            self._queue(self._with_scores(w), w.version, w.first_token)
        self.m.score_waiting.set(len(self.remote))

    def _count_episodes(self, unit: EpisodeGroup) -> None:
        for e in unit.episodes:
            self.m.episodes.labels(e.finish_reason).inc()
            self.m.episode_turns.observe(e.turns)
            self.m.injected_tokens.inc(sum(e.sources))
            for seconds in e.env_seconds:
                self.m.env_seconds.observe(seconds)
            errors = getattr(e.env, "tool_errors", 0)
            if errors:
                self.m.tool_errors.labels("tool_error").inc(errors)
            if e.truncated_observations:
                self.m.tool_errors.labels("observation_truncated").inc(e.truncated_observations)
        self.stats.add_episodes(unit.episodes)

    def pump(self, timeout_s: float) -> None:
        """Send what may be sent, take the acks (and scores) waiting (or arriving within
        timeout_s)."""
        if self.remote is not None:
            self._scored(0.0)
        self.outbox.pump(timeout_s=timeout_s)
        self.m.unacked.set(len(self.outbox))

    def _on_acked(self, seq: int, groups: int) -> None:
        self.m.delivery_seconds.observe(time.monotonic() - self.first_token.pop(seq))
        self._journal(seq, groups, self.completions.pop(seq))

    # ------------------------------------------------------------------ batch generation

    def batch_groups(self, ids: list[int], prompts: dict, samples: list, version: int,
                     wait: Callable[[float], None]) -> list[wire.TrajectoryGroup]:
        """One generate call's groups, scored; with reward.service, once the service has
        answered (`wait(seconds)` serves the control channel meanwhile)."""
        texts = [self.scorer.texts(s) for s in samples]
        groups = [self.scorer.group(self.problems[i], prompts[i], s, version, self.name, t)
                  for i, s, t in zip(ids, samples, texts)]
        if self.remote is None:
            return groups
        self._submit(ids, groups, texts, version, time.monotonic())
        while not (done := self.remote.pump(0.05)):  # the only request waiting: this one
            wait(0.0)
        return self._with_scores(done[0])

    def send_blocking(self, groups: list[wire.TrajectoryGroup], version: int, first_token: float,
                      wait: Callable[[float], None]) -> None:
        """One message, sent until the buffer acks "ok"; `wait(seconds)` serves the control
        channel while a full buffer makes it wait."""
        seq = self._message_seq(groups)
        _send_until_acked(self.buffer, self._encode(groups, version, seq), seq, self.m,
                          self.cfg, wait)
        self.m.delivery_seconds.observe(time.monotonic() - first_token)
        self._journal(seq, len(groups), sum(len(g.completions) for g in groups))

    # ------------------------------------------------------------------ shared

    def _message_seq(self, groups: list[wire.TrajectoryGroup]) -> int:
        self.stats.add(groups)
        self.seq += 1
        return self.seq

    def _encode(self, groups: list[wire.TrajectoryGroup], version: int, seq: int) -> bytes:
        self.m.generated_tokens.inc(sum(g.num_sampled_tokens for g in groups))
        self.m.reward.set(float(np.mean([c.reward for g in groups for c in g.completions])))
        return wire.encode("trajectories", version, sender=self.name,
                           incarnation=self.incarnation, seq=seq, groups=groups)

    def _journal(self, seq: int, groups: int, completions: int) -> None:
        self.acks.write(json.dumps({"incarnation": self.incarnation, "seq": seq,
                                    "groups": groups}) + "\n")
        self.acks.flush()
        self.m.trajectories_sent.inc(completions)


class Scorer:
    """task.rewards (weighted rule-based rewards) plus, optionally, a reward model's score.
    Each completion carries its total reward and the parts it was made of (`reward_parts`:
    each task.rewards function unweighted, and `reward_model`), which the learner logs as
    reward_<name>."""

    def __init__(self, cfg: RunConfig, tok):
        from asyncrl.generator.scoring import ScoreNorm
        from asyncrl.rewards import RewardModelScorer

        self.tok = tok
        self.rules = combine(cfg.task.rewards) if cfg.task.rewards else None
        # With reward.service the reward role scores (add_model_scores), not this process.
        self.rm = (RewardModelScorer(cfg.task.reward_model)
                   if cfg.task.reward_model and not cfg.reward.service else None)
        self.rm_weight = cfg.task.reward_model_weight
        self.norm = ScoreNorm(cfg.reward.normalize)

    def score(self, problem, texts: list[str]) -> tuple[list[float], list[dict[str, float]]]:
        """Each completion's reward and its parts."""
        parts = [self.rules.components(t, problem.answer) if self.rules else {} for t in texts]
        rewards = [sum(self.rules.weights[k] * v for k, v in p.items()) if self.rules else 0.0
                   for p in parts]
        if self.rm is not None:
            scores = self.rm.score([problem.prompt] * len(texts), texts)
            normed = self.norm(scores)
            rewards = [r + self.rm_weight * x for r, x in zip(rewards, normed)]
            parts = [{**p, "reward_model": float(x)} for p, x in zip(parts, scores)]
        return rewards, parts

    def add_model_scores(self, group: wire.TrajectoryGroup, scores: list[float]) -> None:
        """The reward service's scores of one group's completions, into their rewards
        (normalised by reward.normalize, weighted by task.reward_model_weight) and parts
        (raw)."""
        for c, x, n in zip(group.completions, scores, self.norm(scores), strict=True):
            c.reward += self.rm_weight * n
            c.reward_parts = {**(c.reward_parts or {}), "reward_model": float(x)}

    def texts(self, samples) -> list[str]:
        """The completions' text, as the rewards read it."""
        return [self.tok.decode(s.tokens, skip_special_tokens=True) for s in samples]

    def group(self, problem, prompt, samples, version: int, name: str,
              texts: list[str] | None = None) -> wire.TrajectoryGroup:
        texts = self.texts(samples) if texts is None else texts
        rewards, parts = self.score(problem, texts)
        comps = [wire.Completion(np.asarray(s.tokens, np.int32),
                                 np.asarray(s.logprobs, np.float32), r, s.finish_reason,
                                 reward_parts=p)
                 for s, r, p in zip(samples, rewards, parts)]
        return wire.TrajectoryGroup(prompt_id=problem.id,
                                    prompt_tokens=np.asarray(prompt, np.int32),
                                    policy_version=version, completions=comps, generator=name,
                                    created_at=time.time())

    def stream_group(self, problem, g, name: str,
                     texts: list[str] | None = None) -> wire.TrajectoryGroup:
        """A finished SampleGroup, scored: every token keeps the version that sampled it, and
        the group's policy_version is its oldest token's (what its staleness is judged by)."""
        samples = [Sample(s.tokens, s.logprobs, s.finish_reason) for s in g.seqs]
        out = self.group(problem, g.prompt, samples, g.oldest_version, name, texts)
        for c, s in zip(out.completions, g.seqs):
            c.versions = np.asarray(s.versions, np.int64)
        return out


def _send_until_acked(buffer, payload: bytes, seq: int, m, cfg: RunConfig,
                      wait: Callable[[float], None]) -> None:
    """Send until the buffer acks "ok". busy/timeout: `wait` (serving the control channel)
    and resend."""
    deadline = time.monotonic() + cfg.net.ready_timeout_s
    backoff = 0.05
    while True:
        reply = buffer.request(payload, timeout_s=min(10.0, cfg.net.ready_timeout_s))
        if reply is not None:
            try:
                ack = wire.decode(reply, expect=("ack",))
            except wire.MessageError as e:
                m.messages_rejected.labels(e.reason).inc()
                log.warning("bad reply from buffer (%s); resending", e)
                ack = None
            if ack is not None and ack.seq == seq:
                if ack.status == "ok":
                    return
                if ack.status == "rejected":
                    m.rejected.inc()
                    raise RuntimeError(f"buffer rejected our trajectories: {ack.reason}")
                m.busy_retries.inc()
                deadline = time.monotonic() + cfg.net.ready_timeout_s  # buffer alive, just full
        elif time.monotonic() > deadline:
            raise TimeoutError(
                f"no reply from the buffer at {cfg.net.buffer_host}:{cfg.net.buffer_ingest_port} "
                f"for {cfg.net.ready_timeout_s:.0f}s (net.buffer_host / net.ready_timeout_s)")
        wait(backoff)
        backoff = min(1.0, backoff * 2)
