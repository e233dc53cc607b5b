"""The driver of task.agent: runs the agent function group_size times per training problem,
each run one episode against this generator's endpoint (asyncrl/generator/endpoint.py), and
hands each episode's reward (or the agent's error) back to the endpoint.

The episodes run in an agent process of its own (asyncrl/agents/worker.py, spawned), not in
the generator's interpreter: an agent's Python under the generator's GIL made every call wait
on engine steps and the engine on the agent (benchmarks/agent_endpoint.py, docs/performance.md
section 12). The agent function must then be importable by name, as task.agent names it.
`process=False` runs them on an event loop in a thread of the generator instead (any function,
a closure included; for tests and debugging).

A dead agent process (the agent crashed the interpreter) ends its open episodes as agent
errors, so their groups are dropped and counted, and is started again.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import queue
import threading
import time
import uuid

from asyncrl.agents import worker
from asyncrl.generator.endpoint import Endpoint, Reward, group_of

log = logging.getLogger(__name__)


class Driver:
    """group_size episodes per problem it is given; `groups` counts those not yet ended."""

    def __init__(self, fn, endpoint: Endpoint, host: str = "127.0.0.1",
                 process: bool = True):
        self.fn, self.endpoint = fn, endpoint
        self.base = endpoint.url(host)
        self.groups = 0  # started, not ended
        self._count = 0
        self._left: dict[str, int] = {}  # group -> episodes not ended
        self._open: set[str] = set()  # episodes started, not ended
        self._lock = threading.Lock()
        self._closed = False
        if process:
            self._ctx = mp.get_context("spawn")  # never fork a process that runs an engine
            self._results = self._ctx.Queue()
            self._start_process()
            threading.Thread(target=self._collect, name="agent-results", daemon=True).start()
        else:
            self.proc = None
            self.loop = asyncio.new_event_loop()
            threading.Thread(target=self.loop.run_forever, name="agent-driver",
                             daemon=True).start()

    def _start_process(self) -> None:
        self._commands = self._ctx.Queue()
        self.proc = self._ctx.Process(
            target=worker.serve, name="asyncrl-agents", daemon=True,
            args=(self.fn, self.base, self.endpoint.key, self._commands, self._results,
                  os.getpid(), self.endpoint.timeout_s))
        self.proc.start()

    def launch(self, problem, size: int) -> None:
        """group_size episodes of one problem."""
        with self._lock:
            self._count += 1
            self.groups += 1
            gid = f"g{self._count}-{uuid.uuid4().hex[:6]}"
            self._left[gid] = size
            eids = [f"{gid}.{k}" for k in range(size)]
            self._open.update(eids)
        for eid in eids:
            if self.proc is not None:
                self._commands.put((problem, eid))
            else:
                asyncio.run_coroutine_threadsafe(self._episode(problem, eid), self.loop)

    async def _episode(self, problem, eid: str) -> None:  # process=False
        results: queue.SimpleQueue = queue.SimpleQueue()
        await worker._episode(self.fn, problem, eid, self.base, self.endpoint.key, results,
                              self.endpoint.timeout_s)
        self._ended(*results.get())

    def _collect(self) -> None:
        """The agent process's results, to the endpoint; a dead process's episodes end."""
        while not self._closed:
            try:
                self._ended(*self._results.get(timeout=0.5))
            except queue.Empty:
                if not self._closed and not self.proc.is_alive():
                    self._restart()

    def _restart(self) -> None:
        code = self.proc.exitcode
        with self._lock:
            lost = sorted(self._open)
        log.warning("the agent process exited (code %s) with %d episode(s) open; they end "
                    "as agent errors, and it is started again", code, len(lost))
        for eid in lost:
            self._ended(eid, 0.0, f"the agent process exited (code {code})")
        time.sleep(1.0)  # an agent that kills its interpreter at once does not spin
        self._start_process()

    def _ended(self, eid: str, reward: float, error: str) -> None:
        with self._lock:
            if eid not in self._open:
                return
            self._open.discard(eid)
            gid = group_of(eid)
            self._left[gid] -= 1
            if not self._left[gid]:
                del self._left[gid]
                self.groups -= 1
        if error:
            log.warning("agent episode %s failed: %s", eid, error)
        self.endpoint.inbox.put(Reward(eid, reward, error=error))

    def close(self) -> None:
        self._closed = True
        if self.proc is not None:
            self._commands.put(None)
            self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()
        else:
            self.loop.call_soon_threadsafe(self.loop.stop)
