"""The built-in agentic task as an agent of its own: the calculator loop of
asyncrl/env/calculator.py, driven through an OpenAI-compatible endpoint instead of inside the
generator. `task.agent=asyncrl.agents.calculator:episode` (configs/agent-endpoint.yaml).

It is what an agent written against the OpenAI API looks like to asyncrl: it only knows a base
URL and a key, sends its transcript as text to /v1/completions each turn, runs the tool itself
and returns the reward. The generator records the calls and merges them into one trajectory,
the tool's answers injected (masked), so it trains on the same tokens the in-process
environment would give (docs/environments.md, "Bring your own agent").
"""

from __future__ import annotations

MAX_TURNS = 6  # configs/agent.yaml's generator.max_turns


async def episode(problem, base_url: str, api_key: str) -> float:
    from openai import AsyncOpenAI, BadRequestError

    from asyncrl.env.calculator import Calculator

    env = Calculator()
    text = env.reset(problem)
    client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=600)
    reward = 0.0
    try:
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
    finally:
        await client.close()
    return reward + env.score()
