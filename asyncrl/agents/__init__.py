"""Agents written against the OpenAI API, for task.agent (asyncrl/generator/endpoint.py),
and how task.agent names one."""

from __future__ import annotations


def load_agent(spec: str):
    """The async function `package.module:function` names; ValueError naming what is wrong."""
    import importlib
    import inspect

    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"task.agent={spec!r}: give package.module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"task.agent={spec!r}: {e}") from None
    if not inspect.iscoroutinefunction(fn):
        raise ValueError(f"task.agent={spec!r} is not an async function (async def f(problem, "
                         "base_url, api_key) -> reward)")
    return fn
