"""Generator process: sample GRPO groups with vLLM, score them, stream them to the buffer.

Loop: serve weight sync (asyncrl/sync/member.py: say hello, join the learner's session, load a
pushed update), generate
`prompts_per_call` prompts x `group_size` completions under the current policy version,
reward each completion, send the groups to the buffer and wait for its ack. A "busy" ack means
the buffer is full: wait and resend the same message (back-pressure), still serving weight
updates meanwhile so the learner is never blocked on a waiting generator.

With sync.mode=sync the generator makes its share of one learner batch under the current
weights and then waits for the next ones: strictly on-policy, same code as the async mode.

Run (normally started by `asyncrl run`):
    python -m asyncrl generator --config RUN_DIR/config.yaml --index 0
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np

from asyncrl import wire
from asyncrl.config import RunConfig
from asyncrl.rewards import combine
from asyncrl.sync.member import LearnerFinished, SyncMember
from asyncrl.task import encode_prompt, load_task

log = logging.getLogger("asyncrl.generator")


def run(cfg: RunConfig, index: int, model_dir: str, run_dir: Path) -> None:
    from asyncrl.generator.engine import configure_cpu_env

    configure_cpu_env(cfg.generator.kv_cache_gib, cfg.generator.threads)
    from prometheus_client import CollectorRegistry
    from transformers import AutoTokenizer

    from asyncrl import metrics, transport
    from asyncrl.generator.engine import VLLMEngine
    from asyncrl.sync.weights import push_bytes_bound

    name = f"gen{index}"
    registry = CollectorRegistry()
    m = metrics.GeneratorMetrics(registry)
    metrics.serve(registry, cfg.net.bind_host, cfg.net.generator_metrics_port(index))

    tok = AutoTokenizer.from_pretrained(model_dir)
    train, _ = load_task(cfg.task)
    problems = {p.id: p for p in train}
    chat = cfg.task.chat_template
    prompt_ids = {p.id: encode_prompt(tok, p.prompt, chat) for p in train}
    max_len = max(map(len, prompt_ids.values())) + cfg.generator.max_tokens + 8
    engine = VLLMEngine(model_dir, cfg.model.dtype, cfg.generator.seed + index, max_len,
                        cfg.generator.gpu_memory_utilization)

    ctx = transport.context()
    keys = transport.keys_for(cfg.net, cfg.run_dir)
    buffer = transport.Client(ctx, cfg.net.buffer_host, cfg.net.buffer_ingest_port, name, keys)
    control = transport.Client(ctx, cfg.net.learner_host, cfg.net.sync_control_port, name, keys)
    transport.Heartbeat(cfg.net.buffer_host, cfg.net.heartbeat_port,
                        lambda: wire.encode("heartbeat", 0, sender=name, role="generator"),
                        cfg.net.heartbeat_interval_s, keys).start()
    incarnation = uuid.uuid4().hex[:12]  # a restarted generator is a new sender stream
    probe = _Probe(engine, encode_prompt(tok, cfg.sync.probe_prompt, chat), cfg,
                   run_dir / "sync_probe.jsonl", name, incarnation)
    probe.record(0)

    def loaded(version: int, seconds: float, nbytes: int) -> None:
        m.policy_version.set(version)
        m.sync_seconds.observe(seconds)
        m.sync_bytes.inc(nbytes)
        probe.record(version)
        log.info("%s: loaded policy version %d (%.2fs, %.1f MB)", name, version, seconds,
                 nbytes / 1e6)

    sync = SyncMember(control, engine, name, index + 1, incarnation, cfg.net.learner_host,
                      cfg.net.sync_store_port, cfg.sync.backend, cfg.sync.timeout_s,
                      cfg.net.heartbeat_interval_s, cfg.net.ready_timeout_s, loaded,
                      max_weight_bytes=push_bytes_bound(model_dir),
                      rejected=m.messages_rejected)
    sync.hello(force=True)
    log.info("%s: engine up; generating, and joining weight sync when the learner asks", name)

    scorer = _Scorer(cfg, tok)
    rng = random.Random(cfg.generator.seed * 1000 + index)
    train_ids = list(prompt_ids)
    seq = 0
    # sync mode: this generator's share of one learner batch, in whole generate calls.
    share = -(-cfg.learner.groups_per_step // cfg.generator.num_generators)  # ceil
    calls_per_version = -(-share // cfg.generator.prompts_per_call)
    made: Counter[int] = Counter()  # generate calls made under each policy version
    try:
        while True:
            sync.serve(timeout_s=0.0)
            while cfg.sync.mode == "sync" and made[sync.version] >= calls_per_version:
                # Strictly on-policy: this version's share is done; wait for the new weights.
                sync.serve(timeout_s=1.0)
            version = sync.version
            batch = rng.sample(train_ids, cfg.generator.prompts_per_call)
            t0 = time.perf_counter()
            samples = engine.generate([prompt_ids[i] for i in batch], cfg.generator.group_size,
                                      cfg.generator.temperature, cfg.generator.max_tokens)
            m.generate_seconds.observe(time.perf_counter() - t0)
            groups = [scorer.group(problems[i], prompt_ids[i], s, version, name)
                      for i, s in zip(batch, samples)]
            m.generated_tokens.inc(sum(g.num_tokens for g in groups))
            m.reward.set(float(np.mean([c.reward for g in groups for c in g.completions])))
            seq += 1
            payload = wire.encode("trajectories", version, sender=name, incarnation=incarnation,
                                  seq=seq, groups=groups)
            _send_with_backpressure(buffer, payload, seq, sync, m, cfg)
            made[version] += 1
            m.trajectories_sent.inc(sum(len(g.completions) for g in groups))
    except LearnerFinished as e:
        log.info("%s: the learner finished (%s); exiting", name, e)


class _Scorer:
    """task.rewards (weighted rule-based rewards) plus, optionally, a reward model's score."""

    def __init__(self, cfg: RunConfig, tok):
        from asyncrl.rewards import RewardModelScorer

        self.tok = tok
        self.rules = combine(cfg.task.rewards) if cfg.task.rewards else None
        self.rm = RewardModelScorer(cfg.task.reward_model) if cfg.task.reward_model else None
        self.rm_weight = cfg.task.reward_model_weight

    def group(self, problem, prompt, samples, version: int, name: str) -> wire.TrajectoryGroup:
        texts = [self.tok.decode(s.tokens, skip_special_tokens=True) for s in samples]
        rewards = [self.rules(t, problem.answer) if self.rules else 0.0 for t in texts]
        if self.rm is not None:
            scores = self.rm.score([problem.prompt] * len(texts), texts)
            rewards = [r + self.rm_weight * x for r, x in zip(rewards, scores)]
        comps = [wire.Completion(np.asarray(s.tokens, np.int32),
                                 np.asarray(s.logprobs, np.float32), r, s.finish_reason)
                 for s, r in zip(samples, rewards)]
        return wire.TrajectoryGroup(prompt_id=problem.id,
                                    prompt_tokens=np.asarray(prompt, np.int32),
                                    policy_version=version, completions=comps, generator=name,
                                    created_at=time.time())


def _send_with_backpressure(buffer, payload, seq, sync: SyncMember, m, cfg) -> None:
    """Send until the buffer acks "ok". busy/timeout: wait (serving weight updates) and resend."""
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
            if ack is not None and ack["seq"] == seq:
                if ack["status"] == "ok":
                    return
                if ack["status"] == "rejected":
                    m.rejected.inc()
                    raise RuntimeError(f"buffer rejected our trajectories: {ack['reason']}")
                m.busy_retries.inc()
                deadline = time.monotonic() + cfg.net.ready_timeout_s  # buffer alive, just full
        elif time.monotonic() > deadline:
            raise TimeoutError(
                f"no reply from the buffer at {cfg.net.buffer_host}:{cfg.net.buffer_ingest_port} "
                f"for {cfg.net.ready_timeout_s:.0f}s (net.buffer_host / net.ready_timeout_s)")
        sync.serve(timeout_s=backoff)
        backoff = min(1.0, backoff * 2)


class _Probe:
    """Records the engine's logprobs for a fixed prompt after every weight load, so the
    generator/learner mismatch can be checked against a checkpoint of the same version."""

    def __init__(self, engine, prompt: list[int], cfg: RunConfig, path: Path, name: str,
                 incarnation: str):
        self.engine, self.prompt, self.cfg, self.path = engine, prompt, cfg, path
        self.name, self.incarnation = name, incarnation

    def record(self, version: int) -> None:
        s = self.engine.generate([self.prompt], 1, self.cfg.generator.temperature,
                                 self.cfg.generator.max_tokens, seed=0)[0][0]
        with self.path.open("a") as f:
            f.write(json.dumps({"generator": self.name, "incarnation": self.incarnation,
                                "policy_version": version,
                                "prompt_tokens": self.prompt, "tokens": s.tokens,
                                "logprobs": s.logprobs,
                                "temperature": self.cfg.generator.temperature}) + "\n")
