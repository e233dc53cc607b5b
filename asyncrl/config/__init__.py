"""Typed run configuration: one dataclass per role, nested in `RunConfig` (schema.py).

YAML goes through `OmegaConf.structured` + merge + dot-list overrides, so an unknown or
mistyped key fails when the config loads, naming the key. `checks.validate` then checks every
numeric field against its range in `BOUNDS` (bounds.py) and every variant name, and only when
all of those hold the checks that combine or divide fields (checks.py); each failure is one
line naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from asyncrl.config.bounds import BOUNDS, Bound
from asyncrl.config.checks import advisories, validate
from asyncrl.config.schema import (
    ADVANTAGES,
    BUILTIN_MAX_POSITIONS,
    BUILTIN_MODEL,
    KL_ESTIMATORS,
    LOSS_AGG,
    OFFPOLICY,
    PORT_SPAN,
    PRETRAINED_BUILTINS,
    RM_EXACT_BASE,
    SMOLLM2_MODEL,
    STRATEGIES,
    SYNC_BACKENDS,
    TASKS,
    BufferConfig,
    ConfigError,
    EnvConfig,
    GeneratorConfig,
    LaunchConfig,
    LearnerConfig,
    ModelConfig,
    NetConfig,
    RunConfig,
    TaskConfig,
    WarmStartConfig,
    WeightSyncConfig,
)

__all__ = [
    "BOUNDS", "Bound", "advisories", "validate", "ADVANTAGES", "BUILTIN_MAX_POSITIONS",
    "BUILTIN_MODEL",
    "KL_ESTIMATORS", "LOSS_AGG", "OFFPOLICY", "PORT_SPAN", "PRETRAINED_BUILTINS", "RM_EXACT_BASE",
    "SMOLLM2_MODEL",
    "STRATEGIES", "SYNC_BACKENDS", "TASKS", "BufferConfig", "ConfigError", "EnvConfig",
    "GeneratorConfig",
    "LaunchConfig", "LearnerConfig", "ModelConfig", "NetConfig", "RunConfig", "WeightSyncConfig",
    "TaskConfig", "WarmStartConfig", "load_config", "save_config",
]


# Keys that were renamed: the old one is refused naming the new one.
RENAMED = {"sync.interval": "weight_sync.interval", "sync.backend": "weight_sync.backend",
           "sync.timeout_s": "weight_sync.timeout_s", "sync.bucket_mb": "weight_sync.bucket_mb",
           "sync.probe_prompt": "weight_sync.probe_prompt"}


def _check_renamed(layer, where: str) -> None:
    """`sync` said both weight sync and strictly on-policy training: its keys are now
    weight_sync.* and generator.on_policy."""
    old = layer.get("sync") if hasattr(layer, "get") else None
    if old is None:
        return
    keys = list(old.keys()) if hasattr(old, "keys") else []
    said = []
    for k in keys:
        if k == "mode":
            said.append("sync.mode is now generator.on_policy (sync.mode=sync: "
                        "generator.on_policy=true; async: false, the default)")
        elif f"sync.{k}" in RENAMED:
            said.append(f"sync.{k} is now {RENAMED[f'sync.{k}']}")
        else:
            said.append(f"sync.{k} is not a key (weight sync is configured under weight_sync)")
    raise ConfigError(f"{where}: " + "; ".join(said or [
        "the `sync` section is now `weight_sync` (and sync.mode is generator.on_policy)"]))


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> RunConfig:
    """YAML file (optional) + `key=value` overrides -> validated RunConfig."""
    schema = OmegaConf.structured(RunConfig)
    layers = [schema]
    sources: list[str] = []
    try:
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"config file {str(path)!r} does not exist")
            layers.append(OmegaConf.load(path))
            sources.append(f"config file {str(path)!r}")
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
            # `key=` means the empty text, as on a shell line (OmegaConf reads it as None,
            # which no text field takes)
            layers.append(OmegaConf.from_dotlist(
                [f'{o}""' if o.endswith("=") else o for o in overrides]))
            sources.append("the overrides")
        for layer, where in zip(layers[1:], sources):
            _check_renamed(layer, where)
            _check_bools(layer)
        merged = OmegaConf.merge(*layers)
        cfg: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        where = f" in {path}" if path else ""
        raise ConfigError(f"config error{where}: {_describe(e)}") from None
    validate(cfg)
    return cfg


def _bool_fields(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Dotted paths of every bool field of the schema."""
    out = []
    for name, hint in typing.get_type_hints(cls).items():
        if hint is bool:
            out.append(prefix + name)
        elif dataclasses.is_dataclass(hint):
            out += _bool_fields(hint, f"{prefix}{name}.")
    return out


def _check_bools(layer) -> None:
    """OmegaConf takes any integer for a bool (-1 and 99 are true): only 0 and 1 mean one, so
    a count typed into a switch names the field instead of turning it on."""
    for path in _bool_fields():
        v = OmegaConf.select(layer, path, default=None, throw_on_missing=False)
        if isinstance(v, str) and v.strip().lstrip("+-").isdigit():
            v = int(v)
        if type(v) is int and v not in (0, 1):
            raise ConfigError(f"invalid config: {path}={v}: must be true or false")


def _describe(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    first = str(e).splitlines()[0]
    return f"key {key!r}: {first}" if key else first


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
