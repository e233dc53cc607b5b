"""The agent process: where task.agent's episodes run (asyncrl/generator/driver.py starts it).

It imports only the agent's module and what the agent imports (the `openai` client, say),
never the engine: its own interpreter, so the agent's Python (the client's request and
response models, JSON, the tool it runs) never waits on the generator's GIL, nor the engine
loop on it. Episodes come in on one queue as (problem, episode id), results go out on another
as (episode id, reward, error); every episode runs as a task on one event loop. The process
ends on a None command, and by itself within a second of its parent's death (SIGKILL
included), so no agent outlives its generator.
"""

from __future__ import annotations

import asyncio
import math
import os


def serve(fn, base: str, key: str, commands, results, parent: int,
          timeout_s: float = 300.0) -> None:
    """The process's target: run `fn` for every (problem, episode id) on `commands`, each
    for at most timeout_s (generator.episode_timeout_s)."""
    asyncio.run(_serve(fn, base, key, commands, results, parent, timeout_s))


async def _serve(fn, base, key, commands, results, parent, timeout_s) -> None:
    loop = asyncio.get_running_loop()
    running: set[asyncio.Task] = set()
    watch = loop.create_task(_orphaned(parent))
    while True:
        command = await loop.run_in_executor(None, commands.get)
        if command is None:
            break
        problem, eid = command
        task = loop.create_task(_episode(fn, problem, eid, base, key, results, timeout_s))
        running.add(task)
        task.add_done_callback(running.discard)
    watch.cancel()
    for task in list(running):
        task.cancel()


async def _episode(fn, problem, eid: str, base: str, key: str, results,
                   timeout_s: float) -> None:
    """One episode; an agent that raises, returns no finite number or hangs past timeout_s
    ends it as an error (a hung one would otherwise hold its group's place forever)."""
    try:
        try:
            reward = float(await asyncio.wait_for(
                fn(problem, f"{base}/episodes/{eid}/v1", key), timeout_s))
        except asyncio.TimeoutError:
            raise TimeoutError(f"the agent did not finish within {timeout_s:g}s "
                               "(generator.episode_timeout_s)") from None
        if not math.isfinite(reward):
            raise ValueError(f"the agent returned the reward {reward!r}")
        results.put((eid, reward, ""))
    except Exception as e:  # noqa: BLE001 - the agent's failure ends its episode
        results.put((eid, 0.0, str(e)[:200] or type(e).__name__))


async def _orphaned(parent: int) -> None:
    while True:
        await asyncio.sleep(1.0)
        if os.getppid() != parent:
            os._exit(0)
