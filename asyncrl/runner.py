"""Running a run: the one home of what `asyncrl run`, `asyncrl study` and the benchmarks call
(prepare the model, write RUN_DIR/config.yaml, start and supervise every role, summarise).

The role processes themselves are started by asyncrl/launcher.py; this module decides what they
are given.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from asyncrl.config import (
    RM_EXACT_BASE,
    ConfigError,
    RunConfig,
    advisories,
    load_config,
    save_config,
)
from asyncrl.config.fields import RESUME_FREE, flat_settings
from asyncrl.jsonl import read_jsonl


def resolve_model(cfg: RunConfig, progress=print) -> RunConfig:
    """Replace a builtin model path (and a builtin reward model) by the built directory
    (building it once, cached)."""
    policy = cfg.model.path
    if cfg.model.path.startswith("builtin:"):
        from asyncrl.task.tiny_model import prepare_builtin

        cfg.model.path = str(prepare_builtin(cfg, progress))
    if cfg.task.reward_model.startswith("builtin:"):
        from asyncrl.rm.builtin import prepare_builtin_rm

        cfg.task.reward_model = str(prepare_builtin_rm(cfg, policy, progress))
    if cfg.rm.base == RM_EXACT_BASE and policy != cfg.model.path:
        from asyncrl.rm.train import exact_base_dir

        # A directory from here on, as model.path is (the run's saved config names no builtin
        # whose meaning depends on model.path); built only when a reward model trains on it.
        cfg.rm.base = exact_base_dir(cfg, policy)
    return cfg


def run_dir_for(cfg: RunConfig) -> Path:
    if not cfg.run_dir:
        cfg.run_dir = str(Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    path = Path(cfg.run_dir).resolve()
    cfg.run_dir = str(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def execute_run(cfg: RunConfig, out=print) -> int:
    """Prepare the model, write RUN_DIR/config.yaml, run every role until the learner ends.
    A run_dir holding a run that did not finish is resumed (resume_check says when it may be);
    one holding a finished run is refused."""
    from asyncrl.launcher import launch

    explicit = bool(cfg.run_dir)
    run_dir = run_dir_for(cfg)
    resuming = resume_check(cfg, run_dir)
    out(f"[run] run directory {run_dir}")
    if resuming:
        out(f"[run] resuming the unfinished run in {run_dir}: {resume_point(run_dir)}")
    elif not explicit:
        out(f"[run] if this run is stopped, the same command with run_dir={run_dir} resumes it")
    for note in advisories(cfg):
        out(f"[run] note: {note}")
    from asyncrl.transport import client_roles, load_keys, make_keys

    roles = client_roles(cfg.generator.num_generators)
    if (cfg.net.curve or cfg.generator.endpoint) and not cfg.net.keys_dir:
        # every role of this run finds its own there (and the endpoints their bearer key)
        make_keys(run_dir / "keys", roles)
    elif cfg.net.curve:
        for role in ["buffer", *roles]:  # missing keys: fail now, naming them
            load_keys(Path(cfg.net.keys_dir).expanduser(), role)
    resolve_model(cfg, out)
    from asyncrl import devices

    plan = devices.apply(cfg, devices.visible_gpus())  # as the saved config has it
    if resuming:
        _check_same_training(load_config(run_dir / "config.yaml"), cfg, run_dir)
    out(f"[run] {plan.describe()}")
    config_path = run_dir / "config.yaml"
    save_config(cfg, config_path)
    code = launch(cfg, run_dir, config_path, out)
    summary(run_dir, out, cfg if code == 0 else None)
    return code


def resume_check(cfg: RunConfig, run_dir: Path) -> bool:
    """Whether run_dir holds a run to resume (its config.yaml, and no summary.json, which the
    learner writes last). A finished run is refused. The saved config must load (a run
    directory of another asyncrl version may not), and what it trains is compared after the
    model is resolved (_check_same_training)."""
    if (run_dir / "summary.json").exists():
        raise ConfigError(f"run_dir {run_dir} holds a finished run (summary.json); choose "
                          "another run_dir")
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        if (run_dir / "metrics.jsonl").exists():
            raise ConfigError(f"run_dir {run_dir} holds metrics.jsonl but no config.yaml: not "
                              "a run asyncrl can resume; choose another run_dir")
        return False
    try:
        load_config(saved)
    except ConfigError as e:
        raise ConfigError(f"run_dir {run_dir} holds an unfinished run whose config.yaml does "
                          f"not load ({e}); choose another run_dir") from None
    return True


def resume_point(run_dir: Path) -> str:
    """Where a resumed run starts, in words (the learner decides the same from the files)."""
    from asyncrl.learner.checkpoint import newest_step

    step = newest_step(run_dir)
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("step")]
    done = max((r["step"] for r in rows), default=0)
    return (f"checkpoint step {step}" if step else "no checkpoint yet: from the start") + (
        f", then the logged batches up to step {done} replayed" if done > step else "")


def _check_same_training(saved: RunConfig, cfg: RunConfig, run_dir: Path) -> None:
    """Refuse to resume with settings that change what is trained, naming every such key."""
    old, new = flat_settings(saved), flat_settings(cfg)
    differ = [k for k in sorted(old.keys() | new.keys())
              if old.get(k) != new.get(k) and not k.startswith(RESUME_FREE)]
    if differ:
        said = "; ".join(f"{k}: {old.get(k)!r} in the run, {new.get(k)!r} now" for k in differ)
        raise ConfigError(f"run_dir {run_dir} holds an unfinished run trained with other "
                          f"settings ({said}); resume it with its own (RUN_DIR/config.yaml) "
                          "or choose another run_dir")


def summary(run_dir: Path, out=print, cfg: RunConfig | None = None) -> None:
    evals = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "eval_accuracy" in r]
    if len(evals) >= 2:
        a0, a1 = evals[0]["eval_accuracy"], evals[-1]["eval_accuracy"]
        out(f"[run] held-out accuracy: SFT {a0:.1%} -> step {evals[-1]['step']} {a1:.1%} "
            f"({(a1 - a0) * 100:+.1f} points)")
    if (run_dir / "curves.png").exists():
        out(f"[run] plot: {run_dir / 'curves.png'}")
    if cfg is not None:
        judge_against_sft(cfg, run_dir, out)


def judge_against_sft(cfg: RunConfig, run_dir: Path, out=print) -> dict | None:
    """A run that logs the gold reward (task.rewards has `gold`: the built-in preference's,
    configs/rlhf.yaml) on the addition task: its final policy against the SFT policy it
    started from, as the gold preference judges them (RUN_DIR/win_rate.json)."""
    steps = cfg.learner.total_steps
    if "gold" not in cfg.task.rewards or cfg.task.name != "addition":
        return None
    from asyncrl import lora
    from asyncrl.rm.gold import win_rate

    adapter = run_dir / "export" / "final"
    if (adapter / lora.ADAPTER_CONFIG).is_file():  # model.lora: the base with the adapter in
        merged = run_dir / "export" / "final-merged"
        if not (merged / "config.json").is_file():
            lora.merge_into(adapter, cfg.model.path, merged)
    # The final policy in hub format: the last checkpoint (ddp), or the export (fsdp, LoRA).
    final = next((d for d in (run_dir / "checkpoints" / f"step_{steps}",
                              run_dir / "export" / "final",
                              run_dir / "export" / "final-merged")
                  if (d / "config.json").is_file()), None)
    if final is None:
        return None

    w = win_rate(str(final), cfg.model.path, cfg)
    (run_dir / "win_rate.json").write_text(json.dumps(w, indent=1) + "\n")
    out(f"[run] against the SFT policy, as the gold preference judges them: wins "
        f"{w['win_rate']:.1%} of {w['comparisons']} held-out comparisons (ties count half; "
        f"{w['decided_win_rate']:.1%} of those decided); gold reward {w['gold_sft']:.3f} -> "
        f"{w['gold_policy']:.3f}")
    return w


def role_run_dir(cfg: RunConfig) -> Path:
    if not cfg.run_dir:
        raise ConfigError("run_dir must be set when a role is started on its own")
    path = Path(cfg.run_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path
