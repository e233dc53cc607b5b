"""The checks a config passes when it loads: single fields first (each against its range in
BOUNDS, each variant name, each path), then, only when all of those hold, the checks that
combine or divide fields, so no check trips over a value another one would have named
(learner.nproc=0 once raised ZeroDivisionError here). Each failure is one line naming the
field, the value and what is allowed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from asyncrl.config.bounds import BOUNDS
from asyncrl.config.schema import (
    ADVANTAGES,
    BUILTIN_MAX_POSITIONS,
    BUILTIN_PREFERENCES,
    BUILTIN_REWARD_MODELS,
    CACHE_MODES,
    KL_ESTIMATORS,
    LORA_RANKS,
    LORA_TARGETS,
    LOSS_AGG,
    OFFPOLICY,
    PRETRAINED_BUILTINS,
    REWARD_BACKENDS,
    RM_EXACT_BASE,
    RM_LOSSES,
    SCORE_NORMS,
    STRATEGIES,
    SYNC_BACKENDS,
    TASKS,
    ConfigError,
    RunConfig,
)
from asyncrl.rewards import REWARD_FUNCTIONS

TRACKERS = ("tensorboard", "wandb", "mlflow")  # asyncrl/monitor.py's OPENERS
WANDB_MODES = ("auto", "online", "offline")


def validate(cfg: RunConfig) -> None:
    """Single fields first (ranges, variant names), then, only when each of those holds,
    the checks that combine or divide fields: no check trips over a value another one
    would have named (learner.nproc=0 once raised ZeroDivisionError here)."""
    errors = field_errors(cfg) or cross_field_errors(cfg)
    if len(errors) == 1:
        raise ConfigError(f"invalid config: {errors[0]}")
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def field_errors(cfg: RunConfig) -> list[str]:
    """Each field alone: its range, its variant name, the paths it names."""
    lc = cfg.learner
    errs = [e for path, bound in BOUNDS.items() for e in bound.errors(path, _get(cfg, path))]
    if 0 < lc.clip_c <= 1:
        errs.append(f"learner.clip_c={lc.clip_c} must be > 1 (or 0 for off)")
    errs += (_choice("learner.advantage", lc.advantage, ADVANTAGES)
             + _choice("learner.offpolicy", lc.offpolicy, OFFPOLICY)
             + _choice("learner.loss_agg", lc.loss_agg, LOSS_AGG)
             + _choice("learner.kl_estimator", lc.kl_estimator, KL_ESTIMATORS)
             + _choice("learner.kl_mode", lc.kl_mode, ("loss", "reward"))
             + _choice("learner.strategy", lc.strategy, STRATEGIES)
             + _choice("warm_start.lr_schedule", cfg.warm_start.lr_schedule,
                       ("constant", "cosine")))
    errs += _choice("task.eval_reward", cfg.task.eval_reward, REWARD_FUNCTIONS)
    errs += (_choice("rm.loss", cfg.rm.loss, RM_LOSSES)
             + _choice("reward.backend", cfg.reward.backend, REWARD_BACKENDS)
             + _choice("reward.normalize", cfg.reward.normalize, SCORE_NORMS))
    errs += [f"task.rewards has unknown {k!r}: choose from {sorted(REWARD_FUNCTIONS)}"
             for k in cfg.task.rewards if k not in REWARD_FUNCTIONS]
    checks = [
        (cfg.task.name in TASKS,
         f"task.name={cfg.task.name!r}: choose one of {', '.join(TASKS)}"),
        (cfg.weight_sync.backend in SYNC_BACKENDS,
         f"weight_sync.backend={cfg.weight_sync.backend!r}: choose one of "
         f"{', '.join(SYNC_BACKENDS)}"),
        (all(t in TRACKERS for t in cfg.run.trackers),
         f"run.trackers={list(cfg.run.trackers)}: each one of {', '.join(TRACKERS)}"),
        (len(set(cfg.run.trackers)) == len(cfg.run.trackers),
         f"run.trackers={list(cfg.run.trackers)} names a tracker twice"),
        (cfg.run.wandb_mode in WANDB_MODES,
         f"run.wandb_mode={cfg.run.wandb_mode!r}: choose one of {', '.join(WANDB_MODES)}"),
        (str(cfg.generator.prefix_caching).lower() in CACHE_MODES,
         f"generator.prefix_caching={cfg.generator.prefix_caching!r}: choose auto, on or off"),
        (cfg.generator.inflight_update in ("keep", "abort", "drain"),
         f"generator.inflight_update={cfg.generator.inflight_update!r}: choose keep, "
         "abort or drain"),
        (cfg.model.dtype in ("float32", "bfloat16", "float16"),
         f"model.dtype={cfg.model.dtype!r}: choose float32, bfloat16 or float16"),
    ]
    return errs + [msg for ok, msg in checks if not ok] + path_errors(cfg)


def path_errors(cfg: RunConfig) -> list[str]:
    errs = []
    rm = cfg.task.reward_model
    if rm.startswith("builtin:") and rm not in BUILTIN_REWARD_MODELS:
        errs.append(f"task.reward_model={rm!r}: the builtins are "
                    f"{', '.join(BUILTIN_REWARD_MODELS)}")
    elif rm and not rm.startswith("builtin:"):
        errs += _reward_model_errors(rm)
    data = cfg.rm.data
    if data.startswith("builtin:") and data not in BUILTIN_PREFERENCES:
        errs.append(f"rm.data={data!r}: the builtins are {', '.join(BUILTIN_PREFERENCES)}")
    base = cfg.rm.base
    if base == RM_EXACT_BASE and cfg.model.path not in BUILTIN_MAX_POSITIONS:
        errs.append(f"rm.base={base!r} is a tiny builtin model.path built on exact answers; "
                    f"model.path={cfg.model.path!r} is not one of "
                    f"{', '.join(BUILTIN_MAX_POSITIONS)}")
    elif base.startswith("builtin:") and base != RM_EXACT_BASE:
        errs.append(f"rm.base={base!r}: the builtin is {RM_EXACT_BASE}; else a directory")
    if not cfg.model.path.startswith("builtin:"):
        if not Path(cfg.model.path).expanduser().is_dir():
            errs.append(f"model.path={cfg.model.path!r} is not a directory")
        elif not (Path(cfg.model.path).expanduser() / "config.json").is_file():
            errs.append(f"model.path={cfg.model.path!r} has no config.json (hub format?)")
    elif cfg.model.path not in (*BUILTIN_MAX_POSITIONS, *PRETRAINED_BUILTINS):
        errs.append(f"model.path={cfg.model.path!r}: the builtins are "
                    f"{', '.join((*BUILTIN_MAX_POSITIONS, *PRETRAINED_BUILTINS))}")
    return errs


def _reward_model_errors(rm: str) -> list[str]:
    """task.reward_model must be a one-label sequence classifier (what train-rm writes)."""
    import json

    path = Path(rm).expanduser() / "config.json"
    if not path.is_file():
        return [f"task.reward_model={rm!r} has no config.json"]
    try:
        config = json.loads(path.read_text())
        archs, labels = config.get("architectures") or [], config.get("id2label")
    except (OSError, ValueError, AttributeError):
        return [f"task.reward_model={rm!r}: its config.json does not read as a JSON object"]
    if archs and not any(a.endswith(("ForSequenceClassification", "ForRewardModel"))
                         for a in archs):
        return [f"task.reward_model={rm!r} is a {archs[0]}, not a reward model (a "
                "sequence classifier with one label; asyncrl train-rm writes one)"]
    if isinstance(labels, dict) and len(labels) != 1:
        return [f"task.reward_model={rm!r} has {len(labels)} labels; a reward model has 1"]
    return []


def cross_field_errors(cfg: RunConfig) -> list[str]:
    """Checks that combine fields; every field is already in its range."""
    return (_task_errors(cfg) + _warm_start_errors(cfg) + _length_errors(cfg)
            + _net_errors(cfg) + _device_errors(cfg) + _learner_errors(cfg)
            + _buffer_errors(cfg) + _env_errors(cfg) + _lora_errors(cfg)
            + _endpoint_errors(cfg))


def _endpoint_errors(cfg: RunConfig) -> list[str]:
    """generator.endpoint / task.agent: the agents' episodes are the rollout."""
    if not cfg.endpoint_on:
        return []
    errs = _failed([
        (cfg.generator.streaming, "generator.endpoint and task.agent need "
                                  "generator.streaming=true (a call is a request of the "
                                  "streaming generator's engine loop)"),
        (not cfg.generator.on_policy, "generator.endpoint with generator.on_policy: the "
                                      "agents decide when episodes start; use "
                                      "buffer.max_staleness=0 for on-policy data"),
        (not cfg.reward.service, "generator.endpoint with reward.service: an agent's episode "
                                 "is scored by the reward it posts"),
    ])
    if cfg.task.agent:
        from asyncrl.agents import load_agent

        try:
            load_agent(cfg.task.agent)
        except ValueError as e:
            errs.append(str(e))
    return errs


def _lora_errors(cfg: RunConfig) -> list[str]:
    """model.lora: a rank vLLM takes, target modules the model has, no expert layers, and a
    transfer that carries adapters. The model's layers are read from its weight files'
    headers (no torch import: the buffer loads configs too)."""
    lo = cfg.model.lora
    if lo.rank == 0:
        return []
    errs = _failed([
        (lo.rank in LORA_RANKS,
         f"model.lora.rank={lo.rank}: vLLM's LoRA takes {', '.join(map(str, LORA_RANKS))}"),
        (bool(lo.target_modules), "model.lora.target_modules is empty: nothing to adapt"),
        ("lm_head" not in lo.target_modules,
         "model.lora.target_modules has lm_head: the adapters stay on the decoder layers "
         "(vLLM and peft apply an lm_head adapter differently)"),
    ])
    if cfg.model.path.startswith("builtin:"):
        linears = set(LORA_TARGETS)  # every builtin is a Llama decoder
        moe = False
    else:
        linears, moe = model_linears(Path(cfg.model.path).expanduser())
    missing = sorted(set(lo.target_modules) - linears) if linears else []
    if missing:
        errs.append(f"model.lora.target_modules: {missing} is not a layer of {cfg.model.path} "
                    f"(its linear layers: {', '.join(sorted(linears))})")
    if moe and set(lo.target_modules) & moe:
        errs.append(f"model.lora.target_modules: {sorted(set(lo.target_modules) & moe)} are "
                    "expert (MoE) layers; vLLM 0.32's LoRA does not adapt experts on the CPU "
                    "backend, and not in this project yet")
    return errs


def model_linears(path: Path) -> tuple[set[str], set[str]]:
    """(last names of the 2-D weights of a hub-format model, those of them inside expert
    layers), from its *.safetensors headers; (set(), set()) when it has none to read."""
    import json
    import struct

    linears: set[str] = set()
    experts: set[str] = set()
    for f in sorted(path.glob("*.safetensors")):
        try:
            with f.open("rb") as fh:
                size = struct.unpack("<Q", fh.read(8))[0]
                header = json.loads(fh.read(min(size, 1 << 28)))
        except (OSError, ValueError, struct.error):
            continue
        for name, info in header.items():
            if (name.endswith(".weight") and isinstance(info, dict)
                    and len(info.get("shape", ())) == 2 and "embed" not in name):
                last = name.removesuffix(".weight").rsplit(".", 1)[-1]
                linears.add(last)
                if ".experts." in name:
                    experts.add(last)
    try:  # experts fused into 3-D tensors have no 2-D weight to find: the config says
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    if isinstance(config, dict) and any(
            isinstance(config.get(k), int) and config[k] > 0
            for k in ("num_local_experts", "num_experts", "n_routed_experts")):
        experts |= {"gate_proj", "up_proj", "down_proj", "gate_up_proj", "w1", "w2", "w3"}
    return linears, experts


def _env_errors(cfg: RunConfig) -> list[str]:
    """Multi-turn episodes: the environment imports and constructs, and the budgets fit."""
    if not cfg.env.name:
        return []
    from asyncrl.env import EnvError, load_environment

    try:
        load_environment(cfg.env.name, cfg.env.kwargs)
    except EnvError as e:
        return [str(e)]
    gen = cfg.generator
    return _failed([
        (gen.streaming, "env.name needs generator.streaming=true (episodes are a rollout "
                        "kind of the streaming generator)"),
        (gen.max_tokens <= gen.max_episode_tokens,
         f"generator.max_tokens={gen.max_tokens} (per turn) must be <= "
         f"generator.max_episode_tokens={gen.max_episode_tokens}"),
    ])


def _task_errors(cfg: RunConfig) -> list[str]:
    """The task's own fields together: its data file, chat turns, scorers and the
    problems it can make."""
    task = cfg.task
    addition = task.name == "addition"
    return _failed([
        (task.name != "dataset" or Path(task.path).expanduser().is_file(),
         f"task.path={task.path!r} is not a file (task.name=dataset needs one)"),
        (len(task.chat_examples) % 2 == 0,
         f"task.chat_examples has {len(task.chat_examples)} turns: it alternates a user turn "
         "and the assistant's answer, so it needs an even number"),
        (task.chat_template or not (task.system_prompt or task.chat_examples),
         "task.system_prompt and task.chat_examples are chat turns: they need "
         "task.chat_template=true"),
        (task.rewards or task.reward_model,
         "task.rewards is empty and no task.reward_model: nothing scores samples"),
        (task.reward_model or not cfg.reward.service,
         "reward.service=true needs task.reward_model: the reward role serves that model"),
        (not (cfg.reward.service and cfg.env.name),
         "reward.service scores single completions; an episode (env.name) is scored by its "
         "environment"),
        (not addition or task.train_size + task.eval_size <= 100**task.digits,
         f"task.train_size + task.eval_size = {task.train_size + task.eval_size}: exceeds "
         f"the {100**task.digits} distinct problems of task.digits={task.digits}"),
        (task.name not in ("reasoning", "calculator") or task.min_terms <= task.max_terms,
         f"task.min_terms={task.min_terms} > task.max_terms={task.max_terms}"),
        (task.carry_slip == 0 or task.name in ("addition", "reasoning", "calculator"),
         f"task.carry_slip={task.carry_slip} shapes the built-in tasks' SFT references: it "
         f"needs task.name=addition, reasoning or calculator, not {task.name!r}"),
        (task.tool_skip == 0 or task.name == "calculator",
         f"task.tool_skip={task.tool_skip} shapes the calculator task's SFT transcripts: it "
         f"needs task.name=calculator, not {task.name!r}"),
        (task.name != "calculator" or cfg.env.name or task.agent,
         "task.name=calculator is solved with a tool over several turns: it needs "
         "env.name=calculator (or an agent that runs the tool, task.agent)"),
    ])


def _warm_start_errors(cfg: RunConfig) -> list[str]:
    """The warm start's fields against each other and the task's teacher."""
    task = cfg.task
    return _failed([
        (cfg.warm_start.slip_steps == 0 or task.carry_slip > 0,
         f"warm_start.slip_steps={cfg.warm_start.slip_steps} trains on the teacher that forgets "
         "the carry: it needs task.carry_slip > 0"),
        (cfg.warm_start.min_lr_ratio == 0 or cfg.warm_start.lr_schedule == "cosine",
         f"warm_start.min_lr_ratio={cfg.warm_start.min_lr_ratio} is where a cosine schedule "
         f"ends: it needs warm_start.lr_schedule=cosine, not "
         f"{cfg.warm_start.lr_schedule!r}"),
    ])


def _length_errors(cfg: RunConfig) -> list[str]:
    """What the built-in tasks' problem counts and the builtin model's positions leave
    room for: terms, prompts per call, SFT batches, completion tokens."""
    task, gen = cfg.task, cfg.generator
    synthetic = task.name in ("addition", "reasoning", "calculator")
    positions = BUILTIN_MAX_POSITIONS.get(cfg.model.path)
    # BOS, then a, "+", b, "=" (addition) or up to max_terms terms of `digits` digits.
    prompt_tokens = (1 + 2 * task.digits + 2 if task.name == "addition"
                     else 1 + task.max_terms * (task.digits + 1))
    return _failed([
        (task.name not in ("reasoning", "calculator")
         or task.max_terms <= 9 * 10 ** (task.digits - 1),
         f"task.max_terms={task.max_terms}: more than the {9 * 10 ** (task.digits - 1)} "
         f"distinct terms of task.digits={task.digits}"),
        (not synthetic or gen.prompts_per_call <= task.train_size,
         f"generator.prompts_per_call={gen.prompts_per_call}: must be <= "
         f"task.train_size={task.train_size} (a call samples without replacement)"),
        (not (synthetic and positions and cfg.warm_start.steps)
         or cfg.warm_start.batch_size <= task.train_size,
         f"warm_start.batch_size={cfg.warm_start.batch_size}: must be <= "
         f"task.train_size={task.train_size} (a batch samples without replacement)"),
        (not (synthetic and positions)
         or prompt_tokens + cfg.max_completion_tokens + 8 <= positions,
         f"{'generator.max_episode_tokens' if cfg.env.name else 'generator.max_tokens'}="
         f"{cfg.max_completion_tokens}: must be <= "
         f"{(positions or 0) - 8 - prompt_tokens} ({cfg.model.path} has "
         f"{positions} positions for the prompt of {prompt_tokens} tokens at "
         "this task.digits (and task.max_terms), the completion and 8 spare)"),
    ])


def _net_errors(cfg: RunConfig) -> list[str]:
    """Heartbeats and the ports the learner ranks' metrics take."""
    net = cfg.net
    last_port = net.base_port + 60 + cfg.learner_world - 1
    return _failed([
        (net.heartbeat_interval_s < net.heartbeat_timeout_s,
         f"net.heartbeat_interval_s={net.heartbeat_interval_s}: must be < "
         f"net.heartbeat_timeout_s={net.heartbeat_timeout_s}, or live peers look dead"),
        (last_port <= 65535,
         f"learner.nproc x learner.nnodes={cfg.learner_world}: rank metrics ports "
         f"net.base_port+60+rank reach {last_port} > 65535; lower net.base_port"),
    ])


def _device_errors(cfg: RunConfig) -> list[str]:
    """GPU lists against the processes that take them, and the sync backend's needs."""
    gen, lc = cfg.generator, cfg.learner
    return _failed([
        (not gen.device_ids
         or len(gen.device_ids) == gen.engines * gen.tensor_parallel_size,
         "generator.device_ids needs generator.tensor_parallel_size entries per generator "
         f"({gen.num_generators} x {gen.tensor_parallel_size}; generator i takes entries "
         "i*tp .. i*tp+tp-1)" + (", and as many more for the evaluator "
                                 "(generator.eval_engine)" if gen.eval_engine else "")),
        (not lc.device_ids or len(lc.device_ids) == lc.nproc,
         "learner.device_ids needs one entry per rank (learner.nproc)"),
        (cfg.weight_sync.backend != "nccl" or not set(gen.device_ids) & set(lc.device_ids),
         f"generator.device_ids={gen.device_ids} and learner.device_ids={lc.device_ids} "
         f"share GPU(s) {sorted(set(gen.device_ids) & set(lc.device_ids))}: NCCL cannot "
         "broadcast between two ranks on one GPU. Give each its own GPUs, or on a one-GPU "
         "host use weight_sync.backend=ipc (colocated: the learner hands the engine its weights "
         "by CUDA IPC)"),
        (cfg.weight_sync.backend != "ipc" or (lc.nnodes == 1 and lc.nproc == 1
                                        and gen.num_generators == 1
                                        and gen.tensor_parallel_size == 1),
         "weight_sync.backend=ipc (colocated, CUDA IPC) needs one learner rank and one generator "
         "on one GPU: learner.nproc=1, learner.nnodes=1, generator.num_generators=1, "
         "generator.tensor_parallel_size=1"),
    ])


def _learner_errors(cfg: RunConfig) -> list[str]:
    """The learner's timeout, step and ranks against the sync timeout, the generator's
    groups and each other."""
    gen, lc = cfg.generator, cfg.learner
    return _failed([
        (lc.collective_timeout_s > cfg.weight_sync.timeout_s,
         f"learner.collective_timeout_s={lc.collective_timeout_s}: must be > "
         f"weight_sync.timeout_s={cfg.weight_sync.timeout_s} (the other ranks wait while rank 0 "
         "pushes)"),
        (gen.max_inflight >= gen.group_size,
         f"generator.max_inflight={gen.max_inflight}: must be >= generator.group_size="
         f"{gen.group_size} (a group's completions start together)"),
        (lc.groups_per_step % cfg.learner_world == 0,
         f"learner.groups_per_step={lc.groups_per_step} must be divisible by "
         f"learner.nproc x learner.nnodes={cfg.learner_world}"),
        (lc.minibatches <= cfg.groups_per_rank,
         f"learner.minibatches={lc.minibatches}: must be in [1, groups_per_step / "
         f"(nproc x nnodes) = {cfg.groups_per_rank}]"),
        (lc.overlong_cache <= cfg.max_completion_tokens,
         "learner.overlong_cache must be in (0, generator.max_tokens] (with env.name, "
         "generator.max_episode_tokens)"),
        (lc.nnodes == 1 or ":" in lc.rdzv_endpoint,
         "learner.nnodes > 1 needs learner.rdzv_endpoint=host:port"),
    ])


def _buffer_errors(cfg: RunConfig) -> list[str]:
    """The buffer's capacity and staleness bound against the learner's step and the
    sync schedule."""
    lc = cfg.learner
    return _failed([
        (cfg.buffer.capacity_groups >= lc.groups_per_step,
         "buffer.capacity_groups must be >= learner.groups_per_step or no batch ever fits"),
        (not cfg.generator.on_policy or (cfg.buffer.max_staleness == 0
                                         and cfg.weight_sync.interval == 1),
         "generator.on_policy=true needs buffer.max_staleness=0 and weight_sync.interval=1"),
        (cfg.buffer.max_staleness >= cfg.weight_sync.interval - 1,
         f"buffer.max_staleness={cfg.buffer.max_staleness} < weight_sync.interval-1="
         f"{cfg.weight_sync.interval - 1}: generators hold version k*interval while the learner "
         "reaches k*interval+interval-1, so every trajectory would be dropped. Raise "
         "buffer.max_staleness or lower weight_sync.interval"),
    ])


def _failed(checks: list[tuple[Any, str]]) -> list[str]:
    """The message of each check whose condition does not hold."""
    return [msg for ok, msg in checks if not ok]


def advisories(cfg: RunConfig) -> list[str]:
    """Settings that are valid but measured to train badly, each one line naming the fields
    and what was measured (docs/staleness.md); `asyncrl run` prints them and runs anyway."""
    lc = cfg.learner
    if lc.offpolicy != "decoupled" or cfg.buffer.max_staleness < 2:
        return []
    drops = (f" learner.is_cap={lc.is_cap:g} also drops every token whose weight exceeds it, "
             "those the learner has pushed up most since they were sampled (worst held-out "
             "evaluations 32% and 47% at cap 2, 65-69% at cap 5 or no cap)."
             if lc.is_cap < 5 else "")
    one = (" With one update per batch (learner.ppo_epochs x learner.minibatches = 1) that "
           "clip never binds." if lc.ppo_epochs * lc.minibatches == 1 else "")
    return [
        f"learner.offpolicy=decoupled with buffer.max_staleness={cfg.buffer.max_staleness}: "
        "its PPO clip is taken against the learner's policy at each step, so nothing bounds "
        f"how far the policy drifts from the stale data's sampler.{one}{drops} On the "
        "addition task at staleness 4 offpolicy=none held 81-92% held-out accuracy and "
        "tis ended at 83-89% (docs/staleness.md). Prefer offpolicy=none or tis; for decoupled, "
        "learner.is_cap >= 5 and a smaller learner.lr."]


def _get(cfg: RunConfig, path: str) -> Any:
    for name in path.split("."):
        cfg = getattr(cfg, name)
    return cfg


def _choice(field_name: str, value: str, choices) -> list[str]:
    return [] if value in choices else [f"{field_name}={value!r}: choose one of {sorted(choices)}"]
