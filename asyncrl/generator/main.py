"""Generator process: sample GRPO groups with vLLM, score them, stream them to the buffer.

Streaming (generator.streaming, the default; asyncrl/generator/stream.py): up to
`generator.max_inflight` sequences run in the engine; whenever there is room a new prompt
starts (`group_size` requests), a group is scored and queued the moment its last completion
finishes, and up to `generator.send_window` messages travel to the buffer unacknowledged
(asyncrl/generator/outbox.py: kept until acked, resent on timeout, go-back-N on "busy").
Weight sync (asyncrl/sync/member.py: say hello, join the learner's session, load a pushed
update) is served between engine steps, so new weights arrive while requests are in flight;
`generator.inflight_update` says what happens to those (keep, abort and resubmit, or drain).
Every token carries the policy version that sampled it.

Batch generation (generator.streaming=false, for comparison): one blocking generate call of
`prompts_per_call` prompts x `group_size` completions at a time under the current version,
then send the groups and wait for the ack; a "busy" ack means wait and resend (back-pressure),
still serving weight updates meanwhile so the learner is never blocked on a waiting generator.

With sync.mode=sync the generator makes its share of one learner batch under the current
weights and then waits for the next ones: strictly on-policy, same code as the async mode.

Held-out evaluation (asyncrl/generator/evaluate.py): when the learner asks, the generator
evaluates the version it holds (greedy, task.eval_size problems) among its training requests
and answers with the accuracy, tagged with that version.

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
from asyncrl.generator.engine import Sample
from asyncrl.generator.evaluate import EvalResult, Evaluator
from asyncrl.rewards import combine
from asyncrl.sync.member import LearnerFinished, SyncMember
from asyncrl.task import chat_context, encode_prompt, load_task

log = logging.getLogger("asyncrl.generator")


def run(cfg: RunConfig, index: int, model_dir: str, run_dir: Path) -> None:
    from asyncrl.generator.engine import configure_cpu_env, on_gpu

    gc = cfg.generator
    gpu = on_gpu()
    if not gpu:
        configure_cpu_env(gc.kv_cache_gib, gc.threads)
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
    train, held_out = load_task(cfg.task)
    chat, context = cfg.task.chat_template, chat_context(cfg.task)
    prompt_ids = {p.id: encode_prompt(tok, p.prompt, chat, context) for p in train}
    evaluator = Evaluator.for_task(cfg, tok, held_out)
    max_len = max(map(len, [*prompt_ids.values(), *evaluator.prompts])) + gc.max_tokens + 8
    engine = VLLMEngine(model_dir, cfg.model.dtype, gc.seed + index, max_len,
                        gc.gpu_memory_utilization, gpu=gpu, cuda_graphs=gc.cuda_graphs,
                        tensor_parallel_size=gc.tensor_parallel_size)

    ctx = transport.context()
    keys = transport.keys_for(cfg.net, cfg.run_dir, name)
    buffer = transport.Client(ctx, cfg.net.buffer_host, cfg.net.buffer_ingest_port, name, keys)
    control = transport.Client(ctx, cfg.net.learner_host, cfg.net.sync_control_port, name, keys)
    transport.Heartbeat(cfg.net.buffer_host, cfg.net.heartbeat_port,
                        lambda: wire.encode("heartbeat", 0, sender=name, role="generator"),
                        cfg.net.heartbeat_interval_s, keys).start()
    incarnation = uuid.uuid4().hex[:12]  # a restarted generator is a new sender stream
    probe = _Probe(engine, encode_prompt(tok, cfg.sync.probe_prompt, chat, context), cfg,
                   run_dir / "sync_probe.jsonl", name, incarnation)
    probe.record(0)
    stats = _Stats(run_dir / f"{name}_stats.json", "stream" if gc.streaming else "batch",
                   gc.inflight_update)

    def loaded(version: int, seconds: float, nbytes: int) -> None:
        m.policy_version.set(version)
        m.sync_seconds.observe(seconds)
        m.sync_bytes.inc(nbytes)
        stats.pushes, stats.sync_bytes = stats.pushes + 1, nbytes
        probe.record(version)
        log.info("%s: loaded policy version %d (%.2fs, %.1f MB)", name, version, seconds,
                 nbytes / 1e6)

    # Each tensor-parallel worker of the engine takes a sync rank of its own.
    sync = SyncMember(control, engine, name, 1 + index * gc.tensor_parallel_size, incarnation,
                      cfg.net.learner_host, cfg.net.sync_store_port, cfg.sync.backend,
                      cfg.sync.timeout_s, cfg.net.heartbeat_interval_s,
                      cfg.net.ready_timeout_s, loaded,
                      max_weight_bytes=push_bytes_bound(model_dir),
                      rejected=m.messages_rejected)
    sync.hello(force=True)
    log.info("%s: engine up (%s); generating, and joining weight sync when the learner asks",
             name, f"streaming, up to {gc.max_inflight} sequences, in-flight updates: "
             f"{gc.inflight_update}" if gc.streaming else "batch generate calls")
    sync.on_eval_request = evaluator.ask
    gen = _Generation(cfg, name, incarnation, engine, sync, _Scorer(cfg, tok),
                      {p.id: p for p in train}, prompt_ids,
                      random.Random(gc.seed * 1000 + index), m, stats,
                      (run_dir / "acks").joinpath(f"{name}.jsonl"), evaluator)
    try:
        if gc.streaming:
            gen.stream(buffer)
        else:
            gen.batches(buffer)
    except LearnerFinished as e:
        log.info("%s: the learner finished (%s); exiting", name, e)
    finally:
        stats.write()


class _Generation:
    """One generator's loop and what it shares: the engine, weight sync, the scorer, the
    prompts, the ack journal (RUN_DIR/acks/<name>.jsonl, read by asyncrl.audit)."""

    def __init__(self, cfg: RunConfig, name: str, incarnation: str, engine, sync: SyncMember,
                 scorer: _Scorer, problems: dict, prompt_ids: dict, rng: random.Random, m,
                 stats: _Stats, acks_path: Path, evaluator: Evaluator):
        self.cfg, self.name, self.incarnation = cfg, name, incarnation
        self.engine, self.sync, self.scorer, self.m, self.stats = engine, sync, scorer, m, stats
        self.problems, self.prompt_ids, self.rng = problems, prompt_ids, rng
        self.evaluator = evaluator
        self.train_ids = list(prompt_ids)
        acks_path.parent.mkdir(parents=True, exist_ok=True)
        self.acks = acks_path.open("a")
        self.seq = 0
        # sync mode: this generator's share of one learner batch (groups per version).
        self.share = -(-cfg.learner.groups_per_step // cfg.generator.num_generators)  # ceil

    def _message(self, groups: list[wire.TrajectoryGroup], version: int) -> bytes:
        self.seq += 1
        self.m.generated_tokens.inc(sum(g.num_tokens for g in groups))
        self.m.reward.set(float(np.mean([c.reward for g in groups for c in g.completions])))
        return wire.encode("trajectories", version, sender=self.name,
                           incarnation=self.incarnation, seq=self.seq, groups=groups)

    def _acked(self, seq: int, groups: int, completions: int) -> None:
        self.acks.write(json.dumps({"incarnation": self.incarnation, "seq": seq,
                                    "groups": groups}) + "\n")
        self.acks.flush()
        self.m.trajectories_sent.inc(completions)

    def _report(self, r: EvalResult | None) -> None:
        if r is None:
            return
        self.sync.report_eval(r.asked, r.version, r.accuracy, r.problems, r.seconds)
        self.m.eval_seconds.observe(r.seconds)
        self.stats.evals, self.stats.eval_s = self.stats.evals + 1, self.stats.eval_s + r.seconds
        log.info("%s: policy version %d: held-out accuracy %.1f%% (%d problems, %.2fs)",
                 self.name, r.version, 100 * r.accuracy, r.problems, r.seconds)

    # ------------------------------------------------------------------ batch generation

    def _evaluate_asked(self) -> None:
        """Answer the evaluations asked for, on the version the engine holds: between two
        generate calls, and while a full buffer makes a message wait (the learner may be
        waiting for this answer to end the run, and nothing else runs in the engine then)."""
        while self.evaluator.asked:
            self._report(self.evaluator.run_blocking(self.engine, self.sync.version))

    def batches(self, buffer) -> None:
        """One blocking generate call of prompts_per_call prompts at a time; weights change
        only between calls; each message waits for its ack."""
        gc, cfg = self.cfg.generator, self.cfg
        calls_per_version = -(-self.share // gc.prompts_per_call)
        made: Counter[int] = Counter()  # generate calls made under each policy version
        while True:
            self.sync.serve(timeout_s=0.0)
            while cfg.sync.mode == "sync" and made[self.sync.version] >= calls_per_version:
                # Strictly on-policy: this version's share is done; wait for the new weights.
                self._report(self.evaluator.run_blocking(self.engine, self.sync.version))
                self.sync.serve(timeout_s=1.0)
            version = self.sync.version
            self._evaluate_asked()  # between two calls: nothing else is in flight
            batch = self.rng.sample(self.train_ids, gc.prompts_per_call)
            t0 = time.perf_counter()
            samples = self.engine.generate([self.prompt_ids[i] for i in batch], gc.group_size,
                                           gc.temperature, gc.max_tokens)
            busy = time.perf_counter() - t0
            self.m.generate_seconds.observe(busy)
            self.m.engine_busy_seconds.inc(busy)
            self.stats.engine_busy_s += busy
            first_token = time.monotonic() - busy
            groups = [self.scorer.group(self.problems[i], self.prompt_ids[i], s, version,
                                        self.name) for i, s in zip(batch, samples)]
            self.stats.add(groups)
            payload = self._message(groups, version)
            _send_with_backpressure(buffer, payload, self.seq, self.sync, self.m, cfg,
                                    idle=self._evaluate_asked)
            self.m.delivery_seconds.observe(time.monotonic() - first_token)
            self._acked(self.seq, len(groups), sum(len(g.completions) for g in groups))
            made[version] += 1

    # ------------------------------------------------------------------ streaming

    def stream(self, buffer) -> None:
        """Continuous batching (asyncrl/generator/stream.py): new prompts start whenever there
        is room, a group is scored and queued the moment it is complete, sends are pipelined,
        and weight updates load between engine steps."""
        from asyncrl.generator.outbox import Outbox
        from asyncrl.generator.stream import Streamer

        gc, cfg = self.cfg.generator, self.cfg
        streamer = Streamer(self.engine, gc.group_size, gc.temperature, gc.max_tokens,
                            gc.max_inflight, gc.inflight_update, time.monotonic)
        ready: list = []  # complete StreamGroups not yet in a message
        first_token: dict[int, float] = {}  # seq -> earliest first token of its groups
        completions: dict[int, int] = {}

        def acked(seq: int, groups: int) -> None:
            self.m.delivery_seconds.observe(time.monotonic() - first_token.pop(seq))
            self._acked(seq, groups, completions.pop(seq))

        outbox = Outbox(buffer, gc.send_window, min(10.0, cfg.net.ready_timeout_s),
                        cfg.net.ready_timeout_s, acked, self.m.busy_retries.inc,
                        f"{cfg.net.buffer_host}:{cfg.net.buffer_ingest_port}")
        self.sync.before_load = lambda: ready.extend(streamer.before_update(self.sync.version))
        self.sync.after_load = streamer.after_update
        made: Counter[int] = Counter()  # groups started under each policy version
        while True:
            self.sync.serve(timeout_s=0.0)
            version = self.sync.version
            self.evaluator.start(streamer, version)
            while (streamer.room() and not outbox.full()
                   and (cfg.sync.mode == "async" or made[version] < self.share)):
                pid = self.rng.choice(self.train_ids)
                streamer.start(pid, self.prompt_ids[pid], version)
                made[version] += 1
            if streamer.busy:
                t0 = time.perf_counter()
                ready += streamer.step(version)
                busy = time.perf_counter() - t0
                self.m.engine_busy_seconds.inc(busy)
                self.stats.engine_busy_s += busy
            self.m.inflight.set(len(streamer.running))
            self._report(self.evaluator.collect(streamer.take_evals()))
            self.m.eval_load_wait_seconds.inc(streamer.eval_drain_s - self.stats.eval_load_wait_s)
            self.stats.eval_load_wait_s = streamer.eval_drain_s
            if ready and not outbox.full():  # a full window holds finished groups back
                groups = [self.scorer.stream_group(self.problems[g.key], g, self.name)
                          for g in ready]
                self.stats.add(groups)
                payload = self._message(groups, version)
                first_token[self.seq] = min(g.first_token_at or g.started_at for g in ready)
                completions[self.seq] = sum(len(g.completions) for g in groups)
                outbox.put(self.seq, payload, len(groups))
                ready = []
            # Idle (buffer full, or sync mode waiting for new weights): wait on both sockets.
            wait = 0.0 if streamer.busy else 0.02
            outbox.pump(timeout_s=wait)
            self.m.unacked.set(len(outbox))
            if not streamer.busy:
                self.sync.serve(timeout_s=wait)
            self.m.inflight_updates.inc(streamer.updates_in_flight
                                        - self.stats.inflight_updates)
            self.stats.inflight_updates = streamer.updates_in_flight


class _Stats:
    """What this generator did, written to RUN_DIR/<name>_stats.json when it exits (the
    benchmarks and scripts/gpu-smoke.sh read it)."""

    def __init__(self, path: Path, mode: str, inflight_update: str):
        self.path, self.mode, self.inflight_update = path, mode, inflight_update
        self.t0 = time.monotonic()
        self.tokens = self.completions = self.pushes = self.sync_bytes = 0
        self.engine_busy_s = 0.0
        self.inflight_updates = 0
        self.multi_version_completions = 0
        self.evals, self.eval_s, self.eval_load_wait_s = 0, 0.0, 0.0

    def add(self, groups: list[wire.TrajectoryGroup]) -> None:
        for g in groups:
            self.tokens += g.num_tokens
            self.completions += len(g.completions)
            self.multi_version_completions += sum(
                c.versions is not None and len(set(c.versions.tolist())) > 1
                for c in g.completions)

    def write(self) -> None:
        wall = time.monotonic() - self.t0
        self.path.write_text(json.dumps({
            "mode": self.mode, "inflight_update": self.inflight_update, "wall_s": wall,
            "tokens": self.tokens, "completions": self.completions,
            "tokens_per_s": self.tokens / max(self.engine_busy_s, 1e-9),
            "engine_busy_s": self.engine_busy_s,
            "engine_busy_fraction": self.engine_busy_s / max(wall, 1e-9),
            "pushes": self.pushes, "sync_bytes_per_push": self.sync_bytes,
            "inflight_updates": self.inflight_updates,
            "multi_version_completions": self.multi_version_completions,
            "evals": self.evals, "eval_s": self.eval_s,
            "eval_load_wait_s": self.eval_load_wait_s}) + "\n")


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

    def stream_group(self, problem, g, name: str) -> wire.TrajectoryGroup:
        """A finished StreamGroup, scored: every token keeps the version that sampled it, and
        the group's policy_version is its oldest token's (what its staleness is judged by)."""
        samples = [Sample(s.tokens, s.logprobs, s.finish_reason) for s in g.seqs]
        out = self.group(problem, g.prompt, samples, g.oldest_version, name)
        for c, s in zip(out.completions, g.seqs):
            c.versions = np.asarray(s.versions, np.int64)
        return out


def _send_with_backpressure(buffer, payload, seq, sync: SyncMember, m, cfg,
                            idle=lambda: None) -> None:
    """Send until the buffer acks "ok". busy/timeout: wait (serving weight updates, and
    `idle()`: evaluations asked for meanwhile) and resend."""
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
        sync.serve(timeout_s=backoff)
        idle()
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
