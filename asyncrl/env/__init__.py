"""Environments for multi-turn episodes: the model acts, the environment answers, over several
turns, and the episode is scored at the end.

An environment is a class with this interface (a user's is named by import path,
`env.name=package.module:Class`; the built-in ones by name, `BUILTIN`):

    env = Class(**env.kwargs)          # once per episode
    first = env.reset(problem)         # the first prompt: text (or a list of chat messages)
    step = env.step(text)              # the model's turn, decoded: a Step
    reward = env.score()               # the episode's reward, once it is over

`Step(observation, reward=0.0, done=False)`: the observation is text (tokenized once, when it
arrives) or token ids, and goes to the model as the next turn's input; `reward` is a per-turn
reward, added to the episode's; `done` ends the episode (the model answered). An environment
may expose tools (`Tool`: a plain Python function with a name, a description and a JSON-schema
of its arguments), which a chat model's template can render; `parse_call` reads a call from
the model's text. Tool arguments come from the model: no environment evaluates them as code.

Environment steps run in threads (asyncrl/env/pool.py), never in the engine's loop: a slow or
hanging tool holds its own episode only, bounded by env.step_timeout_s.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class Step:
    observation: str | list[int] | None = None
    reward: float = 0.0
    done: bool = False


@dataclass
class Tool:
    """A plain Python function the model may call, described for a chat template."""

    name: str
    description: str
    parameters: dict  # JSON schema of the arguments (an object)
    fn: Callable[..., Any]

    def schema(self) -> dict:
        """The OpenAI-style function description transformers' chat templates render."""
        return {"type": "function", "function": {"name": self.name,
                                                 "description": self.description,
                                                 "parameters": self.parameters}}

    def call(self, arguments: dict) -> str:
        """Run the tool on checked arguments; a bad call is an error text, as a real tool's."""
        missing = [k for k in self.parameters.get("required", []) if k not in arguments]
        unknown = [k for k in arguments if k not in self.parameters.get("properties", {})]
        if missing or unknown:
            return (f"error: {self.name} takes {sorted(self.parameters.get('properties', {}))}"
                    f" (missing {missing}, unknown {unknown})")
        try:
            return str(self.fn(**arguments))
        except Exception as e:  # noqa: BLE001 - the tool's own error goes back to the model
            return f"error: {type(e).__name__}: {e}"


class Environment(Protocol):
    tools: list[Tool]

    def reset(self, problem) -> str | list[dict]: ...

    def step(self, text: str) -> Step: ...

    def score(self) -> float: ...


class EnvError(ValueError):
    """An environment that cannot be loaded or constructed (a config error)."""


_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)


def parse_call(text: str) -> tuple[str, dict] | None | str:
    """The tool call in a model turn, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
    (the form chat templates with tools use): (name, arguments); None when the turn has no
    call; an error text when it has a malformed one."""
    m = _CALL.search(text)
    if m is None:
        return None
    try:
        call = json.loads(m.group(1))
    except json.JSONDecodeError as e:
        return f"error: the tool call is not JSON ({e.msg})"
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return "error: a tool call needs a name"
    args = call.get("arguments", {})
    if not isinstance(args, dict):
        return "error: a tool call's arguments are an object"
    return call["name"], args


BUILTIN = {"calculator": "asyncrl.env.calculator:Calculator"}


@dataclass
class EnvSpec:
    """What makes an environment: a class and the keyword arguments of each construction."""

    cls: type
    kwargs: dict = field(default_factory=dict)
    tools: list[Tool] = field(default_factory=list)  # as the first construction has them

    def make(self):
        return self.cls(**self.kwargs)


def load_environment(name: str, kwargs: dict | None = None) -> EnvSpec:
    """A built-in environment by name or a user's by `package.module:Class`; constructed once
    here, so a class that does not import or construct is an error now, naming env.name."""
    path = BUILTIN.get(name, name)
    if ":" not in path:
        raise EnvError(f"env.name={name!r}: a built-in ({', '.join(BUILTIN)}) or "
                       "package.module:Class")
    module, _, attr = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise EnvError(f"env.name={name!r}: cannot import {path} ({type(e).__name__}: {e})") \
            from None
    spec = EnvSpec(cls, dict(kwargs or {}))
    try:
        probe = spec.make()
    except Exception as e:  # noqa: BLE001 - a user's class: any failure is a config error
        raise EnvError(f"env.name={name!r}: {path}(**env.kwargs) failed: "
                       f"{type(e).__name__}: {e}") from None
    for method in ("reset", "step", "score"):
        if not callable(getattr(probe, method, None)):
            raise EnvError(f"env.name={name!r}: {path} has no {method}() method")
    tools = getattr(probe, "tools", None) or []
    if not isinstance(tools, list) or not all(isinstance(t, Tool) for t in tools):
        raise EnvError(f"env.name={name!r}: {path}.tools is a list of asyncrl.env.Tool")
    spec.tools = list(tools)
    return spec
