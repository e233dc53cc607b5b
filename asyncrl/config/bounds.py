"""The range of every numeric field of RunConfig, by dotted path: what `asyncrl.config.checks`
holds each value to before any check combines fields."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from asyncrl.config.schema import PORT_SPAN


@dataclass(frozen=True)
class Bound:
    """The range of one numeric field (of each element, for a list or dict of numbers)."""

    kind: type  # int or float; a float must also be finite
    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def holds(self, value: Any) -> bool:
        numeric = (int, float) if self.kind is float else (int,)
        if isinstance(value, bool) or not isinstance(value, numeric):
            return False
        if isinstance(value, float) and not math.isfinite(value):  # an int never overflows here
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        what, num = ("an integer", str) if self.kind is int else ("a finite number", "{:g}".format)
        lo, hi = ("(" if self.low_open else "["), (")" if self.high_open else "]")
        note = f" ({self.note})" if self.note else ""
        return f"{what} in {lo}{num(self.low)}, {num(self.high)}{hi}{note}"

    def errors(self, path: str, value: Any) -> list[str]:
        if isinstance(value, dict):
            items = [(f"{path}.{k}", v) for k, v in value.items()]
        elif isinstance(value, list):
            items = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
        else:
            items = [(path, value)]
        return [f"{p}={v}: must be {self.describe()}" for p, v in items if not self.holds(v)]


def _ints(low: int, high: int, note: str = "") -> Bound:
    return Bound(int, low, high, note=note)


def _floats(low: float, high: float, note: str = "", low_open: bool = False) -> Bound:
    return Bound(float, low, high, low_open=low_open, note=note)


def _positive(high: float, note: str = "") -> Bound:
    return Bound(float, 0, high, low_open=True, note=note)


STEPS = 10**6  # step counts and intervals: far beyond any run, far below any overflow
SEED = _ints(0, 2**31 - 1)  # numpy and vLLM take 32-bit seeds (generator i adds i)
DAY_S = 86400.0  # timeouts: zmq polls in int milliseconds, torch in a timedelta
MAX_TOKENS = 2**17  # vLLM's max_model_len, longer than any model's context here
# Every numeric field of RunConfig by dotted path; tests/unit/test_config_bounds.py fails
# when a numeric field has no entry. Upper bounds are where a larger value cannot run: memory
# built at start-up, port numbers, overflow, exp() in float32, or plainly a typo.
BOUNDS: dict[str, Bound] = {
    "seed": SEED,
    "task.digits": _ints(1, 18),  # 100**digits problems; a + b stays in int64
    "task.min_terms": _ints(2, 64, "a sum needs two terms"),
    "task.max_terms": _ints(2, 64),  # a prompt of max_terms x (digits + 1) tokens
    "task.terms_tail": _floats(0, 10, "0: uniform number of terms"),
    "task.carry_slip": _floats(0, 1, "0: an exact teacher"),
    "task.tool_skip": _floats(0, 1, "0: an exact teacher"),
    "task.train_size": _ints(1, 10**6),  # problems are built in memory at start-up
    "task.eval_size": _ints(1, 10**6),
    "task.seed": SEED,
    "task.rewards": _floats(-1000, 1000, "a weight per reward"),
    "task.reward_model_weight": _floats(-1000, 1000),
    "model.lora.rank": _ints(0, 512, "0: off; vLLM takes 1, 8, 16, 32, 64, 128, 256, 320, 512"),
    "model.lora.alpha": _positive(1e6),
    "model.lora.dropout": Bound(float, 0, 1, high_open=True),
    "warm_start.steps": _ints(0, STEPS, "0: RL from random init"),
    "warm_start.seed": _ints(-1, 2**31 - 1, "-1: the run's seed"),
    "warm_start.until_loss": _floats(0, 100, "0: always warm_start.steps"),
    "warm_start.slip_steps": _ints(0, STEPS, "0: the slipping teacher from the start"),
    "warm_start.batch_size": _ints(1, 65536),
    "warm_start.lr": _positive(1.0),
    "warm_start.min_lr_ratio": _floats(0, 1),
    "net.base_port": _ints(1024, 65536 - PORT_SPAN,
                           f"the run uses base_port..base_port+{PORT_SPAN - 1}"),
    "net.heartbeat_interval_s": _floats(0.01, 3600),
    "net.heartbeat_timeout_s": _positive(DAY_S),
    "net.ready_timeout_s": _positive(DAY_S),
    "generator.num_generators": _ints(1, 40, "their metrics ports are base_port+20..59"),
    "generator.prompts_per_call": _ints(1, 10**4),
    "generator.group_size": _ints(2, 1024, "group-relative advantages need a group"),
    "generator.temperature": _positive(10.0),
    "generator.max_tokens": _ints(1, MAX_TOKENS),
    "generator.max_turns": _ints(1, 1024),
    "generator.kv_block_size": _ints(0, 1024, "0: vLLM's"),
    "generator.max_episode_tokens": _ints(1, MAX_TOKENS),
    "generator.episode_timeout_s": _positive(DAY_S),
    "generator.agent_episodes": _ints(0, 1 << 20, "0: twice generator.max_inflight"),
    "env.step_timeout_s": _positive(DAY_S),
    "env.max_observation_tokens": _ints(1, MAX_TOKENS),
    "reward.max_batch": _ints(1, 1 << 16),
    "reward.max_queue": _ints(1, 1 << 24),
    "reward.window": _ints(1, 1024),
    "reward.timeout_s": _positive(DAY_S),
    "reward.device_ids": _ints(0, 1023),
    "reward.max_model_len": _ints(0, MAX_TOKENS, "0: the reward model's positions"),
    "rm.margin": _floats(-100, 100),
    "rm.steps": _ints(1, STEPS),
    "rm.batch_size": _ints(1, 1 << 16),
    "rm.lr": _positive(1.0),
    "rm.weight_decay": _floats(0, 1),
    "rm.max_length": _ints(0, MAX_TOKENS, "0: the base model's positions"),
    "rm.eval_fraction": Bound(float, 0, 1, low_open=True, high_open=True,
                              note="some pairs must be held out and some trained on"),
    "rm.eval_interval": _ints(1, STEPS),
    "rm.pairs": _ints(2, 10**6),
    "rm.rater_temperature": _floats(0, 100, "0: raters always pick the better"),
    "rm.sample_temperature": Bound(float, 0, 10, low_open=True),
    "rm.rounds": _ints(0, 20, "0: the first reward model only"),
    "rm.round_pairs": _ints(2, 10**6),
    "rm.round_steps": _ints(1, STEPS),
    "rm.round_lr": _positive(1.0),
    "generator.kv_cache_gib": _ints(1, 1024),  # vLLM allocates it all at start-up
    "generator.gpu_memory_utilization": _positive(1.0),
    "generator.threads": _ints(1, 1024),
    "generator.device_ids": _ints(0, 1023),
    "generator.tensor_parallel_size": _ints(1, 64),
    "generator.max_inflight": _ints(1, 1 << 16),
    "generator.send_window": _ints(1, 1024),
    "generator.seed": SEED,
    "buffer.max_staleness": _ints(0, STEPS, "0: on-policy only"),
    "buffer.admit_steps": _ints(1, STEPS),
    "buffer.capacity_groups": _ints(1, 10**5),  # held in memory
    "learner.nproc": _ints(1, 1024),
    "learner.nnodes": _ints(1, 1024),
    "learner.total_steps": _ints(1, STEPS),
    "learner.groups_per_step": _ints(1, 10**5),
    "learner.lr": _positive(1.0),
    "learner.warmup_steps": _ints(0, STEPS),
    "learner.weight_decay": _floats(0, 1),
    "learner.adam_eps": _positive(1.0),
    "learner.max_grad_norm": _positive(1e6),
    "learner.clip_low": Bound(float, 0, 1, high_open=True),
    "learner.clip_high": _floats(0, 10),
    "learner.is_cap": _floats(1, 1e4),  # below 1 it would drop on-policy tokens (weight 1)
    "learner.is_low": _floats(0, 1),
    "learner.is_high": _floats(1, 1e4),
    "learner.clip_c": _floats(0, 100, "0: off, else > 1"),
    "learner.ppo_epochs": _ints(1, 100),
    "learner.minibatches": _ints(1, 10**5),
    "learner.pack_row_tokens": _ints(0, 65536, "0: always padded"),  # one row is allocated
    "learner.entropy_coef": _floats(0, 1, "0: off"),
    "learner.log_ratio_clamp": _positive(80.0, "exp(80) is still finite in float32"),
    "learner.kl_coef": _floats(0, 10, "0: off"),
    "learner.kl_clamp": _positive(1e4),
    "learner.overlong_cache": _ints(0, MAX_TOKENS, "0: off"),
    "learner.gamma": _floats(0, 1),
    "learner.lam": _floats(0, 1),
    "learner.vf_coef": _positive(100.0),
    "learner.value_clip": _floats(0, 100, "0: off"),
    "learner.critic_lr": _positive(1.0),
    "learner.eval_interval": _ints(1, STEPS),
    "learner.checkpoint_interval": _ints(1, STEPS),
    "learner.max_restarts": _ints(0, 100),
    "learner.device_ids": _ints(0, 1023),
    "learner.threads": _ints(1, 1024),
    "learner.collective_timeout_s": _positive(2 * DAY_S),
    "learner.seed": SEED,
    "learner.logprob_chunk_tokens": _ints(0, 1 << 20, "0: all positions at once"),
    "learner.export_interval": _ints(0, STEPS, "0: only at the end"),
    "weight_sync.interval": _ints(1, STEPS),
    "weight_sync.timeout_s": _positive(DAY_S),
    "weight_sync.bucket_mb": _ints(1, 1 << 16),  # two buckets are allocated at each end
    "run.max_role_restarts": _ints(0, 100),
    "run.restart_delay_s": _floats(0, 3600, "doubles after each restart"),
    "run.tracker_interval_s": _floats(0.5, 3600),
}

