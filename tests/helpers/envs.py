"""Environments for the end-to-end tests: the calculator, with some episodes whose
environment raises, hangs past env.step_timeout_s, or sleeps (a slow tool)."""

import time

from asyncrl.env.calculator import Calculator


class Flaky(Calculator):
    """By problem id: one in four raises at its first step, one in four hangs for an hour,
    one in four takes `slow_s` per step; the rest is the calculator."""

    def __init__(self, slow_s: float = 0.0, **kw):
        super().__init__(**kw)
        self.slow_s, self.kind = slow_s, 0

    def reset(self, problem):
        self.kind = problem.id % 4
        return super().reset(problem)

    def step(self, text):
        if self.kind == 1:
            raise RuntimeError("the tool's server is down")
        if self.kind == 2:
            time.sleep(3600)
        if self.kind == 3:
            time.sleep(self.slow_s)
        return super().step(text)


class Chatter(Calculator):
    """Answers every turn with a short result and never ends an episode before its turn
    limit, so a model that answers at once still has several turns; scored like the
    calculator on the last answer given."""

    def step(self, text):
        step = super().step(text)
        step.done = False
        if step.observation is None:
            step.observation = "<result>noted</result>\n"
        return step
