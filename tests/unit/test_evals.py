"""Held-out evaluation off the learner: the learner's asking and joining (asyncrl/learner/evals.py)
with a fake sender, and the generator's evaluator (asyncrl/generator/evaluate.py) with the
streaming logic and a fake engine."""

from dataclasses import dataclass

from asyncrl import wire
from asyncrl.generator.engine import Delta
from asyncrl.generator.evaluate import Evaluator
from asyncrl.generator.stream import EvalBatch, Rollout, SampleGroup
from asyncrl.learner.evals import GeneratorEvaluators, RemoteEvals
from tests.helpers.evals import Rows


@dataclass
class _Member:
    incarnation: str


class FakeSender:
    """What GeneratorEvaluators uses of WeightSender: expected, versions(), members, ask_eval,
    poll, eval_results. `answer` is a generator's eval_result arriving; the learner polls for
    it at once (`evals`)."""

    def __init__(self, names=("gen0",)):
        self.expected = list(names)
        self.held = {n: 0 for n in names}
        self.members = {n: _Member("a") for n in names}
        self.asked: list[tuple[str, int]] = []
        self.eval_results = []
        self.evals = None

    def versions(self):
        return dict(self.held)

    def ask_eval(self, name, version):
        self.asked.append((name, version))
        return self.members[name].incarnation

    def poll(self, timeout_s=0.0):
        pass

    def answer(self, asked, version=None, accuracy=0.5, name="gen0"):
        self.eval_results.append(wire.EvalResult(asked if version is None else version,
                                                 sender=name, asked=asked, accuracy=accuracy,
                                                 problems=8, seconds=0.1))
        if self.evals is not None:
            self.evals.poll()


def _evals(sender, interval=2, total=6, timeout_s=100.0, clock=lambda: 0.0):
    rows, accs = Rows(), []
    ev = RemoteEvals(GeneratorEvaluators(sender), interval, total, timeout_s, rows,
                     accs.append, clock=clock)
    sender.evals = ev
    return ev, rows, accs


def _step(ev, sender, v, push=True):
    if push:
        sender.held = {n: v for n in sender.held}
    ev.after_push(v)
    ev.add_row({"step": v, "policy_version": v})


def test_rows_wait_for_their_evaluation_and_go_out_in_order_with_it():
    s = FakeSender()
    ev, rows, accs = _evals(s)
    _step(ev, s, 0)
    assert s.asked == [("gen0", 0)] and rows == []  # row 0 (the SFT policy) waits
    _step(ev, s, 1)
    assert rows == []  # behind row 0
    s.answer(0, accuracy=0.4)
    assert [r["step"] for r in rows] == [0, 1] and rows[0]["eval_accuracy"] == 0.4
    assert "eval_accuracy" not in rows[1] and accs == [0.4]
    _step(ev, s, 2)
    _step(ev, s, 3)
    s.answer(2, accuracy=0.6)
    assert [(r["step"], r.get("eval_accuracy")) for r in rows[2:]] == [(2, 0.6), (3, None)]


def test_an_answer_for_another_version_joins_that_version():
    s = FakeSender()
    ev, rows, _ = _evals(s)
    _step(ev, s, 0)
    s.answer(0)
    _step(ev, s, 1)
    _step(ev, s, 2)  # asked for 2; the generator loaded 3 before it started
    s.answer(2, version=3, accuracy=0.7)  # the answer comes before row 3 is built
    _step(ev, s, 3)
    assert [(r["step"], r.get("eval_accuracy")) for r in rows] == [
        (0, 0.5), (1, None), (2, None), (3, 0.7)]


def test_an_owed_evaluation_waits_for_a_generator_holding_the_version():
    s = FakeSender()
    ev, rows, _ = _evals(s)
    _step(ev, s, 0)
    s.answer(0)
    _step(ev, s, 1)
    _step(ev, s, 2, push=False)  # weight_sync.interval > 1: version 2 was not pushed
    assert s.asked == [("gen0", 0)] and ev.owed
    _step(ev, s, 3)
    assert s.asked[-1] == ("gen0", 3) and not ev.owed


def test_round_robin_over_the_generators_holding_the_version():
    s = FakeSender(["gen0", "gen1"])
    ev, _, _ = _evals(s, interval=1)
    for v in range(3):
        _step(ev, s, v)
        s.answer(v, name=s.asked[-1][0])
    assert [n for n, _ in s.asked] == ["gen0", "gen1", "gen0"]


def test_an_evaluation_is_given_up_when_its_generator_restarts_or_after_the_timeout():
    now = [0.0]
    s = FakeSender()
    ev, rows, _ = _evals(s, timeout_s=10.0, clock=lambda: now[0])
    _step(ev, s, 0)
    s.members["gen0"] = _Member("b")  # restarted before answering
    ev.check()
    assert [r["step"] for r in rows] == [0] and "eval_accuracy" not in rows[0] and ev.owed
    s.answer(0)  # a late answer is not joined anywhere
    _step(ev, s, 1)  # owed: asked at the next version held
    assert s.asked[-1] == ("gen0", 1)
    now[0] = 11.0
    ev.check()
    assert [r["step"] for r in rows] == [0, 1] and ev.owed


def test_finish_waits_for_the_last_version_and_asks_again_if_it_was_given_up():
    s = FakeSender()
    ev, rows, _ = _evals(s, total=2)
    for v in (0, 1, 2):
        _step(ev, s, v)
        if v == 0:
            s.answer(0)
    s.members["gen0"] = _Member("b")  # the generator asked for version 2 restarted
    calls = []

    def keep_in_sync():  # the learner brings it up to date; then it answers
        calls.append(1)
        if len(s.asked) == 3:
            s.answer(2, accuracy=0.9)

    ev.finish(2, keep_in_sync, deadline_s=5.0)
    assert s.asked[-1] == ("gen0", 2) and len(s.asked) == 3
    assert rows[-1] == {"step": 2, "policy_version": 2, "eval_accuracy": 0.9, "eval_s": 0.1,
                        "eval_by": "gen0"}


def test_rows_held_at_a_checkpoint_are_handed_over():
    s = FakeSender()
    ev, _, _ = _evals(s)
    _step(ev, s, 0)
    _step(ev, s, 1)
    assert [r["step"] for r in ev.held_upto(0)] == [0]


# ---------------------------------------------------------------- the generator's side


class FakeEngine:
    """Each request emits one token per step: the number of the weights loaded (so a token
    says which version made it); finishes after `length` tokens or max_tokens."""

    def __init__(self, length=3):
        self.length, self.weights = length, 0
        self.requests = {}
        self.temperatures = {}

    def add(self, rid, prompt, temperature, max_tokens, seed=None):
        self.requests[rid] = [min(self.length, max_tokens), 0]
        self.temperatures[rid] = temperature

    def step(self):
        out = []
        for rid, r in list(self.requests.items()):
            r[1] += 1
            done = r[1] >= r[0]
            out.append(Delta(rid, [self.weights], [-0.1], done, "stop" if done else ""))
            if done:
                del self.requests[rid]
        return out

    def abort(self, ids):
        for rid in ids:
            self.requests.pop(rid, None)

    def generate(self, prompts, n, temperature, max_tokens, seed=None):
        from asyncrl.generator.engine import Sample

        return [[Sample([self.weights] * min(self.length, max_tokens), [-0.1], "stop")]
                for _ in prompts]


def _evaluator(n=4, answers=None):
    # "correct" when the completion's tokens are all the answer's digit: version v's model
    # answers v, so the accuracy says which weights evaluated.
    return Evaluator([[1, 2]] * n, answers or ["1"] * n, lambda ids: "".join(map(str, ids)),
                     lambda text, answer: float(set(text) == {answer}), max_tokens=3,
                     clock=iter(range(10**6)).__next__)


def _rollout(eng, mode="keep", max_inflight=2):
    return Rollout(eng, max_inflight, mode, clock=lambda: 0.0)


def _group(r, key, version, max_tokens=3):
    return r.start(SampleGroup(key, [1], version, 2, 1.0, max_tokens, 0.0))


def _evals_done(r):
    return [u for u in r.take_finished() if isinstance(u, EvalBatch)]


def test_evaluation_requests_are_greedy_and_outside_the_training_budget():
    eng = FakeEngine()
    s = _rollout(eng)
    _group(s, "A", 0)
    ev = _evaluator()
    ev.ask(0)
    assert ev.start(s, 0)
    assert not s.room(2) and len(s.running) == 6 and s.budgeted_running() == 2
    assert sorted(eng.temperatures.values()) == [0.0] * 4 + [1.0] * 2


def test_an_update_lets_a_running_evaluation_finish_under_the_weights_it_evaluates():
    for mode in ("keep", "abort", "drain"):
        eng = FakeEngine(length=3)
        eng.weights = 1
        s = _rollout(eng, mode, max_inflight=4)
        _group(s, "A", 1, max_tokens=10)
        ev = _evaluator()
        ev.ask(1)
        ev.start(s, 1)
        s.step(1)
        assert _evals_done(s) == []  # one token each so far
        s.before_update(1)  # a push of version 2 arrives mid-evaluation
        assert not any(isinstance(u, EvalBatch) for u, _ in s.running.values()), mode
        eng.weights = 2
        s.after_update()
        (batch,) = _evals_done(s)
        r = ev.collect(batch)
        assert (r.asked, r.version, r.accuracy, r.problems) == (1, 1, 1.0, 4), mode


def test_an_evaluation_spanning_two_versions_is_refused():
    eng = FakeEngine()
    s = _rollout(eng, max_inflight=4)
    ev = _evaluator(n=1)
    ev.ask(0)
    ev.start(s, 0)
    s.step(0)
    s.step(1)  # a bug that loaded weights without before_update
    s.step(1)
    try:
        ev.collect(_evals_done(s)[0])
    except RuntimeError as e:
        assert "versions [0, 1]" in str(e)
    else:
        raise AssertionError("accepted an evaluation of two versions")


def test_requests_asked_while_one_runs_wait_their_turn_and_batch_mode_blocks():
    eng = FakeEngine()
    s = _rollout(eng, max_inflight=4)
    ev = _evaluator(n=2)
    ev.ask(0)
    ev.ask(1)
    assert ev.start(s, 0) and not ev.start(s, 0)
    while s.busy:
        s.step(0)
    assert ev.collect(_evals_done(s)[0]).asked == 0
    eng.weights = 1
    r = ev.run_blocking(eng, 1)  # batch generation: one generate call
    assert (r.asked, r.version, r.accuracy) == (1, 1, 1.0) and ev.run_blocking(eng, 1) is None
