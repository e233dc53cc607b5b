"""The built-in agentic task as an agent of its own: the calculator loop of
asyncrl/env/calculator.py, driven through an OpenAI-compatible endpoint instead of inside the
generator. `task.agent=asyncrl.agents.calculator:episode` (configs/agent-endpoint.yaml).

It is what an agent written against the OpenAI API looks like to asyncrl: it only knows a base
URL and a key, sends its transcript as text to /v1/completions each turn, runs the tool itself
and returns the reward. The generator records the calls and merges them into one trajectory,
the tool's answers injected (masked), so it trains on the same tokens the in-process
environment would give (docs/environments.md, "Bring your own agent").

One `AsyncOpenAI` client per event loop and key serves every episode (`with_options` gives each
episode its base URL on the same connection pool): making a client costs about 30 ms (an SSL
context, an HTTP pool), more than the tiny model's whole episode; measured in
benchmarks/agent_endpoint.py.
"""

from __future__ import annotations

import asyncio
import weakref

MAX_TURNS = 6  # configs/agent.yaml's generator.max_turns

_CLIENTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # loop -> {key: client}


def client_for(base_url: str, api_key: str):
    """An `AsyncOpenAI` client for `base_url`, sharing one connection pool per running event
    loop and key (an httpx pool belongs to the loop it first ran on)."""
    from openai import AsyncOpenAI

    clients = _CLIENTS.setdefault(asyncio.get_running_loop(), {})
    shared = clients.get(api_key)
    if shared is None:
        shared = clients[api_key] = AsyncOpenAI(base_url=base_url, api_key=api_key,
                                                max_retries=0, timeout=600)
    return shared.with_options(base_url=base_url)


async def episode(problem, base_url: str, api_key: str) -> float:
    from openai import BadRequestError

    from asyncrl.env.calculator import Calculator

    env = Calculator()
    text = env.reset(problem)
    client = client_for(base_url, api_key)
    reward = 0.0
    for _ in range(MAX_TURNS):
        try:
            reply = await client.completions.create(model="asyncrl", prompt=text)
        except BadRequestError:  # the episode's token budget is spent
            break
        choice = reply.choices[0]
        if choice.finish_reason == "length":  # a turn cut by generator.max_tokens
            break
        step = env.step(choice.text)
        reward += step.reward
        if step.done:
            break
        text += choice.text + (step.observation or "")
    return reward + env.score()
