"""The builtin reward model (task.reward_model=builtin:addition-rm): trained once with the
config's rm.* on the built-in preferences (asyncrl/rm/gold.py) and cached in
warm_start.cache_dir like the builtin policies; with rm.rounds, the last round of iterated
preferences (asyncrl/rm/rounds.py) from that first one, cached beside it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from asyncrl.config import RM_EXACT_BASE
from asyncrl.config.fields import training_fields
from asyncrl.config.schema import BUILTIN_PREFERENCES
from asyncrl.rm.train import exact_base, train_reward_model


def prepare_builtin_rm(cfg, policy: str, progress: Callable[[str], None] = print) -> Path:
    """task.reward_model=builtin:addition-rm: the reward model trained by `train-rm` on the
    built-in preferences over this run's policy (model.path, resolved; `policy` is its name
    before, for rm.base=builtin:policy-exact) with the config's rm.* settings, built once into
    warm_start.cache_dir (builtin_rm_dirs); with rm.rounds, that one is the first round's, and
    the rounds (asyncrl/rm/rounds.py) build the last."""
    from asyncrl.task.build import build_once

    first, out = builtin_rm_dirs(cfg)
    if not (first / "config.json").is_file():
        progress(f"[prepare] training the reward model {cfg.task.reward_model} into {first} "
                 "(once; cached)")
        cfg.rm.data = BUILTIN_PREFERENCES[0]
        if cfg.rm.base == RM_EXACT_BASE:
            cfg.rm.base = exact_base(cfg, policy, progress)
        build_once(first, lambda tmp: train_reward_model(cfg, tmp, progress))
    if out is None:
        return first
    if not (out / "config.json").is_file():
        from asyncrl.rm.rounds import iterate

        progress(f"[prepare] {cfg.rm.rounds} round(s) of iterated preferences from {first.name} "
                 f"into {out} (once; cached; each round an RL run of "
                 f"{cfg.learner.total_steps} steps)")
        cfg.rm.data = BUILTIN_PREFERENCES[0]
        iterate(cfg, first, out, out.with_name(out.name + ".rounds"), progress)
    return out


ROUND_FIELDS = ("rounds", "round_pairs", "round_steps", "round_lr")  # not the first model's


def builtin_rm_dirs(cfg) -> tuple[Path, Path | None]:
    """Where the builtin reward model is cached (cfg: model.path resolved): the first one,
    keyed by the policy's directory and rm.* but the rounds' settings (so adding rounds reuses
    it), and with rm.rounds the last round's, keyed also by the rounds' settings and every
    setting that shapes their RL runs (asyncrl.config.fields.training_fields); else None."""
    import hashlib
    from dataclasses import asdict

    def cached(blob: dict) -> Path:
        key = hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]
        return Path(cfg.warm_start.cache_dir).expanduser() / f"addition-rm-{key}"

    rm = asdict(cfg.rm)
    blob = {"policy": Path(cfg.model.path).name, "seed": cfg.seed, "task": cfg.task.name, "v": 1,
            "rm": {k: v for k, v in rm.items() if k != "out" and k not in ROUND_FIELDS}
            | {"data": BUILTIN_PREFERENCES[0]}}
    first = cached(blob)
    if not cfg.rm.rounds:
        return first, None
    return first, cached({**blob, "first": first.name, "training": training_fields(cfg),
                          "rounds": {k: rm[k] for k in ROUND_FIELDS}})
