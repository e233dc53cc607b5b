"""Running a run: the one home of what `asyncrl run`, `asyncrl study` and the benchmarks call
(prepare the model, write RUN_DIR/config.yaml, start and supervise every role, summarise).

The role processes themselves are started by asyncrl/launcher.py; this module decides what they
are given.
"""

from __future__ import annotations

import time
from pathlib import Path

from asyncrl.config import ConfigError, RunConfig, advisories, save_config
from asyncrl.jsonl import read_jsonl


def resolve_model(cfg: RunConfig, progress=print) -> RunConfig:
    """Replace a builtin model path by the built directory (building it once, cached)."""
    if cfg.model.path.startswith("builtin:"):
        from asyncrl.task.tiny_model import prepare_builtin

        cfg.model.path = str(prepare_builtin(cfg, progress))
    return cfg


def run_dir_for(cfg: RunConfig) -> Path:
    if not cfg.run_dir:
        cfg.run_dir = str(Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    path = Path(cfg.run_dir).resolve()
    cfg.run_dir = str(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def execute_run(cfg: RunConfig, out=print) -> int:
    """Prepare the model, write RUN_DIR/config.yaml, run every role until the learner ends."""
    from asyncrl.launcher import launch

    run_dir = run_dir_for(cfg)
    if (run_dir / "metrics.jsonl").exists():
        raise ConfigError(f"run_dir {run_dir} already holds a run (metrics.jsonl); "
                          "choose another run_dir")
    out(f"[run] run directory {run_dir}")
    for note in advisories(cfg):
        out(f"[run] note: {note}")
    if cfg.net.curve and not cfg.net.keys_dir:
        from asyncrl.transport import make_keys

        make_keys(run_dir / "keys")  # every role of this run finds them in RUN_DIR/keys
    elif cfg.net.curve:
        from asyncrl.transport import load_keys

        load_keys(Path(cfg.net.keys_dir).expanduser())  # missing keys: fail now, naming them
    resolve_model(cfg, out)
    from asyncrl import devices

    out(f"[run] {devices.apply(cfg, devices.visible_gpus()).describe()}")
    config_path = run_dir / "config.yaml"
    save_config(cfg, config_path)
    code = launch(cfg, run_dir, config_path, out)
    summary(run_dir, out)
    return code


def summary(run_dir: Path, out=print) -> None:
    evals = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "eval_accuracy" in r]
    if len(evals) >= 2:
        a0, a1 = evals[0]["eval_accuracy"], evals[-1]["eval_accuracy"]
        out(f"[run] held-out accuracy: SFT {a0:.1%} -> step {evals[-1]['step']} {a1:.1%} "
            f"({(a1 - a0) * 100:+.1f} points)")
    if (run_dir / "curves.png").exists():
        out(f"[run] plot: {run_dir / 'curves.png'}")


def role_run_dir(cfg: RunConfig) -> Path:
    if not cfg.run_dir:
        raise ConfigError("run_dir must be set when a role is started on its own")
    path = Path(cfg.run_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path
