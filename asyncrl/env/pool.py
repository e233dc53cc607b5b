"""Environment calls off the engine's loop: each `reset`/`step`/`score` of an episode runs in a
thread of its own, and the generator polls for the result between engine steps, so a tool
that takes seconds holds its own episode only while the other sequences keep running.

A call that raises ends its episode with finish reason `env_error`; one that has not returned
after env.step_timeout_s ends it with `env_timeout` (its thread is left to finish on its own:
Python cannot stop a thread, and the episode no longer waits for it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

PENDING = object()


class Call:
    """One environment call running in a daemon thread."""

    def __init__(self, fn: Callable[[], Any], timeout_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.timeout_s, self.clock = timeout_s, clock
        self.started = clock()
        self.value: Any = PENDING
        self.error: BaseException | None = None
        self._done = threading.Event()
        threading.Thread(target=self._run, args=(fn,), daemon=True, name="env-call").start()

    def _run(self, fn) -> None:
        try:
            self.value = fn()
        except BaseException as e:  # noqa: BLE001 - any failure of a user's environment
            self.error = e
        self._done.set()

    def result(self) -> tuple[str, Any]:
        """("pending", None), ("ok", value), ("error", exception) or ("timeout", None)."""
        if self._done.is_set():
            return ("error", self.error) if self.error is not None else ("ok", self.value)
        if self.clock() - self.started > self.timeout_s:
            return "timeout", None
        return "pending", None

    def wait(self, timeout_s: float) -> None:
        self._done.wait(timeout_s)
