"""Generator process: sample GRPO groups with vLLM, score them, stream them to the buffer.

Three objects with explicit calls between them: the rollout (asyncrl/generator/stream.py:
what runs in the engine and when a unit of work is complete), control
(asyncrl/generator/control.py: weight sync and the evaluations the learner asks for) and
delivery (asyncrl/generator/delivery.py: scoring and the outbox). `stream` and `batches` below
are the two loops over them.

Streaming (generator.streaming, the default): up to
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

With generator.on_policy=true the generator makes its share of one learner batch under the current
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

from asyncrl import wire
from asyncrl.config import RunConfig
from asyncrl.generator.control import Control, Probe
from asyncrl.generator.delivery import Delivery, Scorer
from asyncrl.generator.engine import engine_length
from asyncrl.generator.evaluate import Evaluator
from asyncrl.generator.stream import Rollout, SampleGroup
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

    from asyncrl import metrics

    name = f"gen{index}"
    registry = CollectorRegistry()
    m = metrics.GeneratorMetrics(registry)
    metrics.serve(registry, cfg.net.bind_host, cfg.net.generator_metrics_port(index))

    tok = AutoTokenizer.from_pretrained(model_dir)
    train, held_out = load_task(cfg.task)
    chat, context = cfg.task.chat_template, chat_context(cfg.task)
    prompt_ids = {p.id: encode_prompt(tok, p.prompt, chat, context) for p in train}
    max_len = engine_length(cfg, model_dir, [*prompt_ids.values(), *(
        encode_prompt(tok, p.prompt, chat, context) for p in held_out)])
    evaluator = Evaluator.for_task(cfg, tok, held_out, context_tokens=max_len)
    engine = _engine(cfg, model_dir, index, max_len, gpu)
    incarnation = uuid.uuid4().hex[:12]  # a restarted generator is a new sender stream
    stats = _Stats(run_dir / f"{name}_stats.json", "stream" if gc.streaming else "batch",
                   gc.inflight_update)
    buffer, member = _connect(cfg, model_dir, name, index, incarnation, engine, m)
    probe = Probe(engine, encode_prompt(tok, cfg.weight_sync.probe_prompt, chat, context),
                  gc.temperature, gc.max_tokens, run_dir / "sync_probe.jsonl", name, incarnation)
    probe.record(0)
    member.hello(force=True)
    log.info("%s: engine up (%s); generating, and joining weight sync when the learner asks",
             name, f"streaming, up to {gc.max_inflight} sequences, in-flight updates: "
             f"{gc.inflight_update}" if gc.streaming else "batch generate calls")
    endpoint, driver = _endpoint(cfg, tok, name, index, max_len, run_dir, m)
    gen = _Generation(
        cfg, engine, Control(name, member, evaluator, probe, m, stats),
        Delivery(cfg, name, incarnation, Scorer(cfg, tok), {p.id: p for p in train}, buffer, m,
                 stats, (run_dir / "acks").joinpath(f"{name}.jsonl"),
                 _reward_service(cfg, name, incarnation, m)),
        prompt_ids, random.Random(gc.seed * 1000 + index), m, stats,
        _unit_kind(cfg, tok, prompt_ids, {p.id: p for p in train}, max_len),
        endpoint, driver, {p.id: p for p in train})
    try:
        if gc.streaming:
            gen.stream()
        else:
            gen.batches()
    except LearnerFinished as e:
        log.info("%s: the learner finished (%s); exiting", name, e)
    finally:
        stats.write()


def _endpoint(cfg: RunConfig, tok, name: str, index: int, max_len: int, run_dir: Path, m):
    """generator.endpoint / task.agent: the OpenAI-compatible endpoint, serving, and the
    driver that runs task.agent against it; (None, None) when neither is on."""
    if not cfg.endpoint_on:
        return None, None
    from asyncrl.agents import load_agent
    from asyncrl.generator.driver import Driver
    from asyncrl.generator.endpoint import Endpoint
    from asyncrl.transport import endpoint_key

    endpoint = Endpoint(cfg, tok, name, index, max_len,
                        endpoint_key(Path(cfg.net.keys_dir or run_dir / "keys")), m)
    endpoint.start()
    driver = Driver(load_agent(cfg.task.agent), endpoint) if cfg.task.agent else None
    return endpoint, driver


def _engine(cfg: RunConfig, model_dir: str, index: int, max_len: int, gpu: bool):
    from asyncrl.generator.engine import VLLMEngine, adapter_root

    gc = cfg.generator
    lo = cfg.model.lora
    return VLLMEngine(model_dir, cfg.model.dtype, gc.seed + index, max_len,
                      gc.gpu_memory_utilization, gpu=gpu, cuda_graphs=gc.cuda_graphs,
                      tensor_parallel_size=gc.tensor_parallel_size,
                      prefix_caching=cfg.prefix_caching, block_size=gc.kv_block_size,
                      lora_rank=lo.rank, max_loras=max_loras(cfg),
                      adapter_dir=adapter_root(f"gen{index}") if lo.rank else None)


def max_loras(cfg: RunConfig) -> int:
    """Adapters the engine keeps loaded and runs in one batch (model.lora): with in-flight
    updates kept, a running request finishes on the version it started under, and the
    buffer takes data up to buffer.max_staleness versions old, so max_staleness + 1 versions
    may run at once, plus the one just pushed."""
    return cfg.buffer.max_staleness + 2


def _connect(cfg: RunConfig, model_dir: str, name: str, index: int, incarnation: str, engine,
             m):
    """The buffer client, the heartbeat, and the weight-sync member on the learner's control
    port (each tensor-parallel worker of the engine takes a sync rank of its own)."""
    from asyncrl import transport
    from asyncrl.sync.weights import push_bytes_bound

    ctx = transport.context()
    keys = transport.keys_for(cfg.net, cfg.run_dir, name)
    buffer = transport.Client(ctx, cfg.net.buffer_host, cfg.net.buffer_ingest_port, name, keys)
    control = transport.Client(ctx, cfg.net.learner_host, cfg.net.sync_control_port, name, keys)
    transport.Heartbeat(cfg.net.buffer_host, cfg.net.heartbeat_port,
                        lambda: wire.encode("heartbeat", 0, sender=name, role="generator"),
                        cfg.net.heartbeat_interval_s, keys).start()
    tp = cfg.generator.tensor_parallel_size
    member = SyncMember(control, engine, name, 1 + index * tp, incarnation,
                        cfg.net.learner_host, cfg.net.sync_store_port, cfg.sync_backend,
                        cfg.weight_sync.timeout_s, cfg.net.heartbeat_interval_s,
                        cfg.net.ready_timeout_s, max_weight_bytes=push_bytes_bound(model_dir),
                        rejected=m.messages_rejected, lora_rank=cfg.model.lora.rank)
    return buffer, member


def _reward_service(cfg: RunConfig, name: str, incarnation: str, m):
    """With reward.service, this generator's side of it (asyncrl/generator/scoring.py)."""
    if not cfg.reward.service:
        return None
    from asyncrl import transport
    from asyncrl.generator.scoring import RemoteRewards

    net = cfg.net
    client = transport.Client(transport.context(), net.reward_host, net.reward_port, name,
                              transport.keys_for(net, cfg.run_dir, name))
    return RemoteRewards(client, name, incarnation, cfg.reward.window, cfg.reward.timeout_s,
                         net.ready_timeout_s, f"{net.reward_host}:{net.reward_port}", m)


def _unit_kind(cfg: RunConfig, tok, prompt_ids: dict, problems: dict, context_tokens: int):
    """What one training prompt becomes in the rollout: (prompt id, version, now) -> a unit.
    A SampleGroup (group_size completions), or with env.name an EpisodeGroup (group_size
    multi-turn episodes, asyncrl/generator/episode.py)."""
    gc = cfg.generator
    if not cfg.env.name:
        return lambda pid, version, now: SampleGroup(pid, prompt_ids[pid], version, gc.group_size,
                                                     gc.temperature, gc.max_tokens, now)
    from asyncrl.generator.episode import EpisodeGroup, episode_parts

    spec, codec, budgets = episode_parts(cfg, tok, context_tokens)
    return lambda pid, version, now: EpisodeGroup(pid, [problems[pid]] * gc.group_size, spec,
                                                  codec, budgets, gc.temperature, version, now)


class _Generation:
    """One generator's loops over its rollout, control and delivery."""

    def __init__(self, cfg: RunConfig, engine, control: Control, delivery: Delivery,
                 prompt_ids: dict, rng: random.Random, m, stats: _Stats, new_unit,
                 endpoint=None, driver=None, problems: dict | None = None):
        self.cfg, self.engine, self.control, self.delivery = cfg, engine, control, delivery
        self.new_unit = new_unit  # _unit_kind's
        # generator.endpoint: agents' calls and episodes (asyncrl/generator/endpoint.py);
        # task.agent: the driver that runs the agent on the training problems
        self.endpoint, self.driver, self.problems = endpoint, driver, problems or {}
        self.prompt_ids, self.rng, self.m, self.stats = prompt_ids, rng, m, stats
        self.train_ids = list(prompt_ids)
        # generator.on_policy: this generator's share of one learner batch (per version).
        self.share = -(-cfg.learner.groups_per_step // cfg.generator.num_generators)  # ceil

    # ------------------------------------------------------------------ streaming

    def stream(self) -> None:
        """Continuous batching: new prompts start whenever there is room, a group is scored
        and queued the moment it is complete, sends are pipelined, and weight updates load
        between engine steps."""
        gc = self.cfg.generator
        rollout = Rollout(self.engine, gc.max_inflight, gc.inflight_update, time.monotonic,
                          salt_versions=self.cfg.prefix_caching,
                          adapters=self.cfg.model.lora.rank > 0)
        control, delivery = self.control, self.delivery
        made: Counter[int] = Counter()  # groups started under each policy version
        ready: list = []  # complete groups (SampleGroup, EpisodeGroup) not yet in a message
        endpoint = self.endpoint
        while True:
            control.serve(0.0, rollout)  # loads between two engine steps
            control.start_eval(rollout)
            if endpoint is not None:
                endpoint.poll(rollout, control.version)
                self._launch_agents()
                ready += endpoint.take_groups()
            else:
                self._admit(rollout, made)
            if rollout.busy:
                self._step(rollout)
            for unit in rollout.take_finished():
                if unit.evaluation:
                    control.finish_eval(unit)
                elif getattr(unit, "call", None) is not None:  # an endpoint call
                    endpoint.finished(unit)
                else:
                    ready.append(unit)
            if ready and not delivery.full():  # a full window holds finished groups back
                delivery.send(ready, control.version)
                ready = []
            # Idle (buffer full, or on-policy waiting for new weights): wait on both sockets.
            wait = 0.0 if rollout.busy else 0.002 if endpoint is not None else 0.02
            delivery.pump(wait)
            if not rollout.busy:
                control.serve(wait, rollout)
            self._gauges(rollout)

    def _launch_agents(self) -> None:
        """task.agent: start groups of the agent's episodes on training problems while fewer
        than generator.agent_episodes / group_size are open (and the send window has room)."""
        gc = self.cfg.generator
        if self.driver is None:
            return
        episodes = gc.agent_episodes or 2 * gc.max_inflight
        while (self.driver.groups < max(1, episodes // gc.group_size)
               and not self.delivery.full()):
            self.driver.launch(self.problems[self.rng.choice(self.train_ids)], gc.group_size)

    def _admit(self, rollout: Rollout, made: Counter) -> None:
        """Start new prompts while there is room (and, on-policy, while this version's share
        of the batch is not started)."""
        gc, version = self.cfg.generator, self.control.version
        while (rollout.room(gc.group_size) and not self.delivery.full()
               and (not self.cfg.generator.on_policy or made[version] < self.share)):
            rollout.start(self.new_unit(self.rng.choice(self.train_ids), version,
                                        rollout.clock()), version)
            made[version] += 1

    def _step(self, rollout: Rollout) -> None:
        t0 = time.perf_counter()
        rollout.step(self.control.version)
        busy = time.perf_counter() - t0
        self.m.engine_busy_seconds.inc(busy)
        self.stats.engine_busy_s += busy

    def _gauges(self, rollout: Rollout) -> None:
        self.m.inflight.set(rollout.budgeted_running())
        self.m.eval_load_wait_seconds.inc(rollout.one_version_wait_s
                                          - self.stats.eval_load_wait_s)
        self.stats.eval_load_wait_s = rollout.one_version_wait_s
        self.m.inflight_updates.inc(rollout.updates_in_flight - self.stats.inflight_updates)
        self.stats.inflight_updates = rollout.updates_in_flight
        self.m.prompt_tokens.inc(rollout.prompt_tokens - self.stats.prompt_tokens)
        self.m.cached_tokens.inc(rollout.cached_tokens - self.stats.cached_tokens)
        self.stats.prompt_tokens, self.stats.cached_tokens = (rollout.prompt_tokens,
                                                               rollout.cached_tokens)

    # ------------------------------------------------------------------ batch generation

    def batches(self) -> None:
        """One blocking generate call of prompts_per_call prompts at a time; weights change
        only between calls; each message waits for its ack."""
        gc, control = self.cfg.generator, self.control
        calls_per_version = -(-self.share // gc.prompts_per_call)
        made: Counter[int] = Counter()  # generate calls made under each policy version
        while True:
            control.serve(0.0)
            while self.cfg.generator.on_policy and made[control.version] >= calls_per_version:
                # Strictly on-policy: this version's share is done; wait for the new weights.
                control.evaluate_blocking()
                control.serve(1.0)
            version = control.version
            control.evaluate_blocking()  # between two calls: nothing else is in flight
            batch = self.rng.sample(self.train_ids, gc.prompts_per_call)
            t0 = time.perf_counter()
            samples = self.engine.generate([self.prompt_ids[i] for i in batch], gc.group_size,
                                           gc.temperature, gc.max_tokens)
            busy = time.perf_counter() - t0
            self.m.generate_seconds.observe(busy)
            self.m.engine_busy_seconds.inc(busy)
            self.stats.engine_busy_s += busy
            groups = self.delivery.batch_groups(batch, self.prompt_ids, samples, version,
                                                self._wait)
            self.delivery.send_blocking(groups, version, time.monotonic() - busy, self._wait)
            made[version] += 1

    def _wait(self, seconds: float) -> None:
        """While a full buffer makes a message wait: weight sync, and the evaluations asked
        for (the learner may be waiting for one to end the run)."""
        self.control.serve(seconds)
        self.control.evaluate_blocking()


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
        self.episodes, self.turns, self.env_s = 0, 0, 0.0
        self.prompt_tokens = self.cached_tokens = 0
        self.finish_reasons: Counter[str] = Counter()

    def add(self, groups: list[wire.TrajectoryGroup]) -> None:
        for g in groups:
            self.tokens += g.num_sampled_tokens
            self.completions += len(g.completions)
            self.multi_version_completions += sum(
                c.versions is not None and len(set(c.versions.tolist())) > 1
                for c in g.completions)

    def add_episodes(self, episodes: list) -> None:
        for e in episodes:
            self.episodes += 1
            self.turns += e.turns
            self.env_s += sum(e.env_seconds)
            self.finish_reasons[e.finish_reason] += 1

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
            "episodes": self.episodes, "turns": self.turns, "env_s": self.env_s,
            "finish_reasons": dict(self.finish_reasons),
            "prompt_tokens": self.prompt_tokens, "prefix_cache_hit_tokens": self.cached_tokens,
            "eval_load_wait_s": self.eval_load_wait_s}) + "\n")
