"""Held-out evaluation, learner side: ask a generator to evaluate a version it holds, and join
the answers into metrics.jsonl by version, without ever waiting for one while training.

When: version 0 (the SFT policy) and every `learner.eval_interval` versions an evaluation is
owed; it is asked for at the first version pushed at or after that (with
weight_sync.interval=1, that very version) from a generator that confirmed holding it (round
robin over the generators), so the version evaluated is the version asked for. The generator
answers with the accuracy and the version its engine held (asyncrl/generator/evaluate.py).

Joining: metrics.jsonl keeps one row per step, in order, and a row carries the evaluation of
its version. A row is therefore written once no evaluation asked at or before its version is
outstanding: rows wait (in memory, a few steps) while an answer is on its way, training does
not. An answer tagged with another version than asked goes to that version's row if it is not
written yet. An evaluation is given up (its row goes out without accuracy, the next pushed
version owes one) when its generator restarted before answering or after `timeout_s`. At the
end of the run the learner waits for the last version's evaluation (`finish`), asking again if
it was given up, so the final accuracy is known.

A learner restart loses the evaluations in flight: the rows up to the checkpoint still held
are saved with it (`held_upto`) and written without accuracy on resume.

Who evaluates is an `Evaluators`: the generators (`GeneratorEvaluators`: asked and answered
over the weight-sync control channel, asyncrl/sync/sender.py), or with generator.eval_engine
the evaluator process (`FileEvaluators`: through files in RUN_DIR/evals/,
asyncrl/generator/eval_engine.py; the learner writes a due version's weights there, asking is
writing its request, the answers are its result files). The asking, joining and giving up
above are the same; what differs is that no push is held back for the evaluator
(`hold_pushes`), since it is not in the weight broadcast.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from asyncrl import wire
    from asyncrl.monitor import Monitor
    from asyncrl.sync.sender import WeightSender

log = logging.getLogger(__name__)


@dataclass
class _Asked:
    name: str
    token: str  # Evaluators.ask's, for Evaluators.gone
    at: float  # clock() when asked


def due(version: int, interval: int, total_steps: int) -> bool:
    """Whether `version` is owed an evaluation: version 0, every `interval`, and the last."""
    return version % interval == 0 or version == total_steps


class Evaluators(Protocol):
    """Who evaluates, as RemoteEvals asks them."""

    names: list[str]
    hold_pushes: bool  # a due push waits while one of them evaluates

    def holding(self) -> dict[str, int]:
        """The policy version each one holds now."""

    def ask(self, name: str, version: int) -> str | None:
        """Ask `name` to evaluate `version`; a token for `gone`, or None if it cannot be asked."""

    def gone(self, name: str, token: str) -> bool:
        """Whether the one asked with `token` is gone (restarted) and will never answer."""

    def answers(self, timeout_s: float = 0.0) -> list:
        """The answers (asked, policy_version, accuracy, seconds, sender) since the last call;
        with none, wait up to timeout_s for one."""


class GeneratorEvaluators:
    """The generators: a generator evaluates the version its engine holds, among its training
    requests, and its weight load waits for that, so pushes are held back meanwhile."""

    hold_pushes = True

    def __init__(self, sender: WeightSender):
        self.sender = sender
        self.names = sender.expected

    def holding(self) -> dict[str, int]:
        return self.sender.versions()

    def ask(self, name: str, version: int) -> str | None:
        return self.sender.ask_eval(name, version)

    def gone(self, name: str, token: str) -> bool:
        m = self.sender.members.get(name)
        return m is None or m.incarnation != token

    def answers(self, timeout_s: float = 0.0) -> list:
        if not self.sender.eval_results:
            self.sender.poll(timeout_s)
        got, self.sender.eval_results = self.sender.eval_results, []
        return got


class RemoteEvals:
    def __init__(self, evaluators: Evaluators, interval: int, total_steps: int,
                 timeout_s: float, out: Monitor, on_accuracy: Callable[[float], None],
                 clock: Callable[[], float] = time.monotonic):
        """out: where a row goes once its evaluation is joined (a Monitor: metrics.jsonl);
        on_accuracy(acc) runs for every answer (the Prometheus gauge)."""
        self.evaluators, self.hold_pushes = evaluators, evaluators.hold_pushes
        self.interval, self.total_steps = interval, total_steps
        self.timeout_s, self.out, self.on_accuracy, self.clock = (timeout_s, out, on_accuracy,
                                                                  clock)
        self.owed = False  # an evaluation is due at the next version a generator holds
        self.pending: dict[int, _Asked] = {}  # version asked for -> who
        self.held: list[dict] = []  # rows not written yet, in step order
        self.early: dict[int, dict] = {}  # answers for versions whose row is not built yet
        self.asks = 0
        self.last_added = -1  # policy_version of the newest row added
        self.last_pushed = -1  # the newest version after_push has seen
        self.finishing = False  # no row goes out before the last answer (or the deadline)

    # ------------------------------------------------------------------ asking

    def due(self, version: int) -> bool:
        return due(version, self.interval, self.total_steps)

    def after_push(self, version: int) -> None:
        """After the sync of `version` (pushed or not), before its row is added: owe an
        evaluation if it is due, and ask for an owed one when a generator holds exactly this
        version."""
        if version > self.last_pushed:
            self.last_pushed = version
            self.owed = self.owed or self.due(version)
        if not self.owed or version in self.pending:
            return
        held = self.evaluators.holding()
        names = self.evaluators.names
        for k in range(len(names)):
            name = names[(self.asks + k) % len(names)]
            if held.get(name) != version:
                continue
            token = self.evaluators.ask(name, version)
            if token is not None:
                self.pending[version] = _Asked(name, token, self.clock())
                self.owed, self.asks = False, self.asks + 1
                return

    # ------------------------------------------------------------------ rows and answers

    def add_row(self, row: dict) -> None:
        """The row of a step (its policy_version); written as soon as nothing before it is
        outstanding."""
        answer = self.early.pop(row["policy_version"], None)
        if answer is not None:
            row.update(answer)
        self.held.append(row)
        self.last_added = row["policy_version"]
        self._flush()

    def on_result(self, msg: wire.EvalResult) -> None:
        """An eval_result from a generator."""
        asked, version = msg.asked, msg.policy_version
        if self.pending.pop(asked, None) is None:
            log.warning("an evaluation of version %d from %s that was not asked for (or was "
                        "given up); not joined", version, msg.sender)
            self._flush()
            return
        self.on_accuracy(msg.accuracy)
        answer = {"eval_accuracy": msg.accuracy, "eval_s": msg.seconds,
                  "eval_by": msg.sender}
        row = next((r for r in self.held if r["policy_version"] == version), None)
        if row is not None:
            row.update(answer)
        elif version > self.last_added:
            self.early[version] = answer
        else:
            log.warning("the evaluation of version %d (asked for %d) came after its row was "
                        "written; not joined", version, asked)
        self._flush()

    def _flush(self) -> None:
        if self.finishing:
            return
        first_pending = min(self.pending, default=None)
        while self.held and (first_pending is None
                             or self.held[0]["policy_version"] < first_pending):
            row = self.held.pop(0)
            self.out.log(row, row["step"])

    def poll(self, timeout_s: float = 0.0) -> None:
        """Join the answers that came (waiting up to timeout_s for one), then `check`."""
        for msg in self.evaluators.answers(timeout_s):
            self.on_result(msg)
        self.check()

    def check(self) -> None:
        """Give up evaluations whose evaluator restarted or that took longer than timeout_s;
        the next version pushed owes one instead."""
        now = self.clock()
        for version, a in list(self.pending.items()):
            restarted = self.evaluators.gone(a.name, a.token)
            if restarted or now - a.at > self.timeout_s:
                log.warning("gave up the evaluation of version %d by %s (%s)", version,
                            a.name, "it restarted" if restarted
                            else f"no answer within {self.timeout_s:.0f}s (weight_sync.timeout_s)")
                del self.pending[version]
                self.owed = True
        self._flush()

    # ------------------------------------------------------------------ restarts, the end

    def held_upto(self, step: int) -> list[dict]:
        """The rows up to `step` not written yet (saved with a checkpoint at `step`)."""
        return [r for r in self.held if r["step"] <= step]

    def finish(self, version: int, keep_in_sync: Callable[[], None], deadline_s: float) -> None:
        """End of training: wait (up to deadline_s) for the evaluations outstanding, asking
        again for the last version's if it was given up; then write every row."""
        end = self.clock() + deadline_s
        # An evaluation given up now is asked again for the same version: keep its row.
        self.finishing = True
        while (self.pending or self.owed) and self.clock() < end:
            keep_in_sync()  # brings a restarted generator up to `version`
            self.after_push(version)
            self.poll(0.2)
        if self.pending or self.owed:
            log.error("no evaluation of the final version %d within %.0fs; metrics.jsonl ends "
                      "without it", version, deadline_s)
        self.pending.clear()
        self.finishing = False
        self._flush()


@dataclass(frozen=True)
class _FileAnswer:
    """An evaluator's result file, shaped as the eval_result `RemoteEvals.on_result` reads."""

    asked: int
    policy_version: int
    accuracy: float
    seconds: float
    sender: str = "evaluator"


class FileEvaluators:
    """The evaluator process (generator.eval_engine; its files are described in
    asyncrl/generator/eval_engine.py). It "holds" the newest version whose weights are written
    (`exported`), version 0 being the model the run starts from; asking writes the request;
    the answers are its result files. A restarted evaluator answers what is asked, so it is
    never gone."""

    NAME = "evaluator"
    hold_pushes = False

    def __init__(self, run_dir: Path, sleep: Callable[[float], None] = time.sleep):
        from asyncrl.generator import eval_engine as files

        self.files, self.sleep = files, sleep
        self.dir = Path(run_dir) / files.EVALS_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.names = [self.NAME]
        self.exported = 0
        self.asked: set[int] = set()

    def holding(self) -> dict[str, int]:
        return {self.NAME: self.exported}

    def ask(self, name: str, version: int) -> str:
        self.files.write_atomic(self.files.ask_path(self.dir, version), {"version": version})
        self.asked.add(version)
        return "files"

    def gone(self, name: str, token: str) -> bool:
        return False

    def answers(self, timeout_s: float = 0.0) -> list[_FileAnswer]:
        got = []
        for version in sorted(self.asked):
            path = self.files.result_path(self.dir, version)
            if not path.exists():
                continue
            self.asked.discard(version)
            r = self.files.read_result(path)
            if r is None or r["version"] != version:  # not joined: given up on timeout
                continue
            got.append(_FileAnswer(version, version, float(r["accuracy"]), float(r["seconds"])))
        if not got and timeout_s > 0:
            self.sleep(timeout_s)
        return got
