"""Multi-turn episodes with a fake engine and the real calculator environment: exact token ids
between turns (never re-encoded), the source of every token, per-token versions across an
update between turns and within one, environments that raise or hang, a slow tool that holds
its own episode only, and the budgets."""

import threading
import time

import numpy as np
import pytest

from asyncrl import wire
from asyncrl.env import EnvError, EnvSpec, Step, load_environment, parse_call
from asyncrl.env.calculator import Calculator
from asyncrl.generator.engine import Delta
from asyncrl.generator.episode import INJECTED, SAMPLED, Budgets, Codec, EpisodeGroup
from asyncrl.generator.stream import Rollout
from asyncrl.learner.batch import collate
from asyncrl.task.addition import Problem

CODEC = Codec(prompt=lambda text: [ord(c) for c in text],
              decode=lambda ids: "".join(map(chr, ids)),
              observation=lambda text: [ord(c) for c in text])


def solver_turn(transcript: str) -> str:
    """What a perfect tool user says next, from the transcript so far."""
    prompt = transcript.split("=")[0]
    terms = [int(t) for t in prompt.split("+")]
    results = [int(r.split("</result>")[0]) for r in transcript.split("<result>")[1:]
               if r.split("</result>")[0].isdigit()]
    done = len(results)
    if done == len(terms) - 1:
        return f"<answer>{results[-1] if results else terms[0]}</answer>"
    left = results[-1] if results else terms[0]
    return f"<calc>{left}+{terms[done + 1]}</calc>"


class FakeEngine:
    """Each request answers with solver_turn of its prompt, one character per step, each
    with logprob -(weights + 1) / 10, then stops. `say` overrides what a turn says."""

    def __init__(self, say=solver_turn):
        self.say, self.weights = say, 0
        self.requests, self.added = {}, []

    def add(self, rid, prompt, temperature, max_tokens, seed=None):
        # A resubmitted turn (abort mode) continues what its prompt already holds of it.
        transcript = "".join(map(chr, prompt))
        start = max(transcript.rfind("="), transcript.rfind("\n")) + 1
        partial = transcript[start:]
        text = self.say(transcript[:start])
        if not text.startswith(partial):  # a new turn after a cut observation
            text, partial = self.say(transcript), ""
        self.requests[rid] = [list(text[len(partial):].encode()), 0, max_tokens]
        self.added.append((rid, list(prompt), max_tokens))

    def step(self):
        out = []
        for rid, r in list(self.requests.items()):
            toks, i, cap = r
            r[1] += 1
            done = r[1] >= min(len(toks), cap)
            out.append(Delta(rid, [toks[i]], [-(self.weights + 1) / 10], done,
                             ("length" if r[1] >= cap and r[1] < len(toks) else "stop")
                             if done else ""))
            if done:
                del self.requests[rid]
        return out

    def abort(self, ids):
        for rid in ids:
            self.requests.pop(rid, None)


def _budgets(**kw):
    b = dict(max_turns=8, turn_tokens=32, episode_tokens=400, observation_tokens=64,
             step_timeout_s=10.0)
    b.update(kw)
    return Budgets(**b)


def _group(problem, env_cls=Calculator, size=2, budgets=None, version=0, kwargs=None):
    return EpisodeGroup(problem.id, [problem] * size, EnvSpec(env_cls, kwargs or {}), CODEC,
                        budgets or _budgets(), 1.0, version, 0.0)


def _run(rollout, version=0, until=lambda r: not r.busy, limit=2000):
    done = []
    for _ in range(limit):
        rollout.step(version)
        done += rollout.take_finished()
        if until(rollout):
            return done
        time.sleep(0.001)
    raise AssertionError("the rollout did not finish")


P = Problem(0, "17+5+33=", "55")


def test_a_three_turn_episode_keeps_the_exact_ids_with_their_sources():
    eng = FakeEngine()
    r = Rollout(eng, 16, "keep", clock=time.monotonic)
    unit = r.start(_group(P, size=1))
    (done,) = _run(r)
    ep = done.episodes[0]
    text = "".join(map(chr, ep.ids))
    assert text == ("<calc>17+5</calc><result>22</result>\n<calc>22+33</calc>"
                    "<result>55</result>\n<answer>55</answer>")
    assert (ep.turns, ep.finish_reason, ep.reward) == (3, "stop", 1.0)
    # Each turn's request is the prompt plus every id so far: nothing decoded and re-encoded.
    prompts = [p for _, p, _ in eng.added]
    assert prompts[0] == ep.prompt
    for _, p, _ in eng.added[1:]:
        assert p == ep.prompt + ep.ids[: len(p) - len(ep.prompt)]
        assert ep.sources[len(p) - len(ep.prompt) - 1] == INJECTED  # after an observation
    sampled = [c for c, s in zip(text, ep.sources) if s == SAMPLED]
    assert "".join(sampled) == "<calc>17+5</calc><calc>22+33</calc><answer>55</answer>"
    assert all(lp == 0.0 for lp, s in zip(ep.logprobs, ep.sources) if s == INJECTED)
    assert all(lp == -0.1 for lp, s in zip(ep.logprobs, ep.sources) if s == SAMPLED)
    assert unit is done


def test_the_group_travels_with_its_sources_and_the_learner_masks_injected_tokens():
    r = Rollout(FakeEngine(), 16, "keep", clock=time.monotonic)
    r.start(_group(P, size=2))
    (unit,) = _run(r)
    g = unit.trajectory("gen0")
    out = wire.decode(wire.encode("trajectories", 0, sender="gen0", incarnation="a", seq=1,
                                  groups=[g])).groups[0]
    for a, b in zip(g.completions, out.completions):
        assert np.array_equal(a.sources, b.sources) and np.array_equal(a.tokens, b.tokens)
        assert b.reward == 1.0 and b.reward_parts == {
            "env": 1.0, "episode_turns": 3.0, "episode_tool_calls": 2.0,
            "episode_tool_errors": 0.0}
    batch = collate([out], pad_id=0)
    P_len = len(out.prompt_tokens)
    sources = out.completions[0].sources
    row = batch.completion_mask[0, P_len - 1: P_len - 1 + len(sources)]
    assert row.tolist() == [float(s == SAMPLED) for s in sources]
    assert batch.num_completion_tokens == 2 * int((sources == 0).sum())
    assert g.num_sampled_tokens == batch.num_completion_tokens


def test_an_update_between_two_turns_gives_an_episode_tokens_of_two_versions():
    eng = FakeEngine()
    r = Rollout(eng, 16, "keep", clock=time.monotonic)
    r.start(_group(P, size=1))
    version = 0
    done = []
    while not done:
        r.step(version)
        done = r.take_finished()
        ep = r.units[0].episodes[0] if r.units else done[0].episodes[0]
        if version == 0 and ep.turns == 1:  # the first turn is over: a push lands
            r.before_update(0)
            eng.weights = version = 1
            r.after_update()
        time.sleep(0.001)
    ep = done[0].episodes[0]
    sampled = [(v, lp) for v, lp, s in zip(ep.versions, ep.logprobs, ep.sources) if s == SAMPLED]
    first = len("<calc>17+5</calc>")
    assert {v for v, _ in sampled[:first]} == {0} and {v for v, _ in sampled[first:]} == {1}
    assert {lp for _, lp in sampled[first:]} == {-0.2}
    assert done[0].oldest_version == 0


def test_abort_mid_turn_resubmits_the_episode_with_its_tokens_so_far():
    eng = FakeEngine()
    r = Rollout(eng, 16, "abort", clock=time.monotonic)
    unit = r.start(_group(P, size=1))
    while sum(len(s.tokens) for s in unit.seqs) < 4:
        r.step(0)
    (rid, prompt, _), = [a for a in eng.added]
    r.before_update(0)
    eng.weights = 1
    r.after_update()
    _, again, cap = eng.added[-1]
    assert again == prompt + list(b"<cal") and cap == 32 - 4
    (done,) = _run(r, version=1)
    ep = done.episodes[0]
    assert "".join(map(chr, ep.ids)).startswith("<calc>17+5</calc><result>22</result>")
    assert ep.versions[:4] == [0, 0, 0, 0] and ep.versions[4] == 1


class Raising(Calculator):
    def step(self, text):
        raise RuntimeError("the tool's server is down")


class Hanging(Calculator):
    def step(self, text):
        time.sleep(3600)


class NotAStep(Calculator):
    def step(self, text):
        return "a string, not a Step"


@pytest.mark.parametrize("env_cls,reason", [(Raising, "env_error"), (Hanging, "env_timeout"),
                                            (NotAStep, "env_error")])
def test_an_environment_that_raises_or_hangs_ends_its_episode_and_the_others_go_on(env_cls,
                                                                                  reason):
    r = Rollout(FakeEngine(), 16, "keep", clock=time.monotonic)
    bad = r.start(_group(P, env_cls, size=1, budgets=_budgets(step_timeout_s=0.3)))
    good = r.start(_group(Problem(1, "1+2=", "3"), size=1))
    done = _run(r)
    assert {id(u) for u in done} == {id(bad), id(good)}
    assert (bad.episodes[0].finish_reason, bad.episodes[0].reward) == (reason, 0.0)
    assert (good.episodes[0].finish_reason, good.episodes[0].reward) == ("stop", 1.0)


class Slow(Calculator):
    def step(self, text):
        time.sleep(0.5)
        return super().step(text)


def test_a_slow_tool_holds_its_own_episode_while_the_others_run():
    eng = FakeEngine()
    r = Rollout(eng, 16, "keep", clock=time.monotonic)
    slow = r.start(_group(P, Slow, size=1))
    while not slow.episodes[0].waiting:
        r.step(0)
    t0 = time.monotonic()
    fast = r.start(_group(Problem(1, "1+2+3=", "6"), size=1))
    steps = 0
    while not fast.done:
        r.step(0)
        steps += 1
    assert time.monotonic() - t0 < 0.5 and slow.episodes[0].waiting  # done while it waits
    assert steps > 10
    _run(r)
    assert slow.episodes[0].reward == 1.0


def test_budgets_end_an_episode_with_the_reason_the_learner_sees():
    always_calls = FakeEngine(say=lambda t: "<calc>1+1</calc>")
    r = Rollout(always_calls, 16, "keep", clock=time.monotonic)
    turns = r.start(_group(P, size=1, budgets=_budgets(max_turns=3)))
    short = r.start(_group(P, size=1, budgets=_budgets(episode_tokens=40)))
    rambling = r.start(_group(P, size=1, budgets=_budgets(turn_tokens=5)))
    _run(r)
    assert (turns.episodes[0].finish_reason, turns.episodes[0].turns) == ("max_turns", 3)
    assert short.episodes[0].finish_reason == "length" and len(short.episodes[0].ids) <= 40
    for cap in range(15, 60, 3):  # wherever the budget falls: in a turn or an observation
        u = r.start(_group(P, size=1, budgets=_budgets(episode_tokens=cap)))
        _run(r)
        assert u.episodes[0].finish_reason == "length" and len(u.episodes[0].ids) <= cap, cap
        assert len(u.episodes[0].ids) == cap or u.episodes[0].sources[-1] == SAMPLED
    assert rambling.episodes[0].finish_reason == "length"
    assert rambling.episodes[0].turns == 1 and len(rambling.episodes[0].ids) == 5
    for u in (turns, short, rambling):
        assert u.episodes[0].reward == 0.0
    long_obs = r.start(_group(P, size=1, budgets=_budgets(observation_tokens=4)))
    _run(r)
    e = long_obs.episodes[0]
    assert e.truncated_observations >= 1
    injected = [i for i, s in enumerate(e.sources) if s == INJECTED]
    assert len(injected) == 4 * e.truncated_observations


def test_the_calculator_answers_bad_calls_as_a_tool_would_and_never_runs_code():
    env = Calculator()
    env.reset(P)
    assert env.step("<calc>17+5</calc>") == Step("<result>22</result>\n")
    assert env.step("<calc>+33</calc>") == Step("<result>55</result>\n")  # its memory
    for bad in ("<calc>__import__('os').system('x')</calc>", "<calc>1*2</calc>",
                "<calc>1+</calc>", "hello", "<calc>" + "9" * 40 + "+1</calc>"):
        obs = env.step(bad).observation
        assert obs.startswith("<result>error") and not env.step(bad).done
    assert (env.tool_calls, env.tool_errors) == (12, 10) and env.score() == 0.0
    assert env.step("<answer>55</answer>").done and env.score() == 1.0


def test_a_tool_call_is_parsed_or_answered_with_an_error():
    assert parse_call('x <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
                      ) == ("add", {"a": 1, "b": 2})
    assert parse_call("no call") is None
    assert parse_call("<tool_call>{oops}</tool_call>").startswith("error: the tool call is not")
    assert parse_call('<tool_call>{"arguments": {}}</tool_call>') == "error: a tool call needs a name"
    tool = Calculator().tools[0]
    assert tool.call({"a": 2, "b": 3}) == "5"
    assert tool.call({"a": 2}).startswith("error: add takes")
    assert tool.call({"a": "x", "b": 1}).startswith("error: TypeError")
    assert tool.schema()["function"]["name"] == "add"


class BadInit:
    def __init__(self, **kw):
        raise ValueError("needs a server address")


class NoStep:
    def reset(self, problem):
        return ""

    def score(self):
        return 0.0


@pytest.mark.parametrize("name,says", [
    ("nope", "a built-in (calculator) or package.module:Class"),
    ("tests.unit.test_episode:Missing", "cannot import tests.unit.test_episode:Missing"),
    ("no_such_module_x:Env", "cannot import no_such_module_x:Env"),
    ("tests.unit.test_episode:BadInit", "failed: ValueError: needs a server address"),
    ("tests.unit.test_episode:NoStep", "has no step() method"),
])
def test_an_environment_that_does_not_load_is_an_error_naming_env_name(name, says):
    with pytest.raises(EnvError) as e:
        load_environment(name)
    assert f"env.name={name!r}" in str(e.value) and says in str(e.value)


def test_the_config_names_a_bad_environment_when_it_loads():
    from asyncrl.config import ConfigError, load_config
    from tests.conftest import ROOT

    with pytest.raises(ConfigError, match="env.name='tests.unit.test_episode:BadInit'"):
        load_config(ROOT / "configs" / "default.yaml",
                    ["env.name=tests.unit.test_episode:BadInit"])
    cfg = load_config(ROOT / "configs" / "default.yaml", ["env.name=calculator"])
    assert cfg.max_completion_tokens == cfg.generator.max_episode_tokens
    with pytest.raises(ConfigError, match="env.name needs generator.streaming=true"):
        load_config(ROOT / "configs" / "default.yaml",
                    ["env.name=calculator", "generator.streaming=false"])


def test_env_calls_run_in_threads_of_their_own():
    seen = []

    class Where(Calculator):
        def step(self, text):
            seen.append(threading.current_thread().name)
            return super().step(text)

    r = Rollout(FakeEngine(), 16, "keep", clock=time.monotonic)
    r.start(_group(P, Where, size=1))
    _run(r)
    assert seen and all(n == "env-call" for n in seen)


def test_held_out_episodes_are_greedy_of_one_version_and_scored_by_the_environment():
    from asyncrl.generator.episode import EvalEpisodes
    from asyncrl.generator.evaluate import Evaluator

    problems = [P, Problem(1, "1+2=", "3"), Problem(2, "4+4+4=", "13")]  # the last one wrong
    ev = Evaluator([[1]] * 3, ["x"] * 3, lambda ids: "", lambda t, a: 0.0, 8,
                   episodes=lambda: EvalEpisodes(problems, EnvSpec(Calculator), CODEC,
                                                 _budgets()))
    # Streaming: one unit among the training work, outside the budget, at temperature 0.
    eng = FakeEngine()
    r = Rollout(eng, 2, "keep", clock=time.monotonic)
    ev.ask(5)
    assert ev.start(r, 5) and r.room(2)
    (unit,) = _run(r, version=5)
    assert unit.evaluation and all(s.temperature == 0.0 for s in unit.seqs)
    res = ev.collect(unit)
    assert (res.asked, res.version, res.accuracy) == (5, 5, pytest.approx(2 / 3))
    # Blocking (the evaluator process, batch generation): the same episodes alone.
    ev.ask(6)
    res = ev.run_blocking(FakeEngine(), 6)
    assert (res.asked, res.version, res.accuracy) == (6, 6, pytest.approx(2 / 3))


class Garbage(Calculator):
    """Answers with what it was told to: an observation or reward no episode can take."""

    answer_with = None

    def step(self, text):
        kind, value = self.answer_with
        if kind == "score":
            self.score = lambda: value
            return Step(done=True)
        return Step(**{kind: value})


@pytest.mark.parametrize("answer", [("observation", {"text": "x"}), ("observation", [1, -2]),
                                    ("observation", [10**9]), ("observation", [1.5]),
                                    ("reward", float("nan")), ("reward", "lots"),
                                    ("score", "x"), ("score", float("inf"))])
def test_an_environment_answering_garbage_ends_its_episode_not_the_generator(answer):
    env_cls = type("G", (Garbage,), {"answer_with": answer})
    codec = Codec(CODEC.prompt, CODEC.decode, CODEC.observation, vocab_size=300)
    r = Rollout(FakeEngine(), 16, "keep", clock=time.monotonic)
    bad = r.start(EpisodeGroup(P.id, [P], EnvSpec(env_cls), codec, _budgets(), 1.0, 0, 0.0))
    good = r.start(_group(Problem(1, "1+2=", "3"), size=1))
    _run(r)
    assert (bad.episodes[0].finish_reason, bad.episodes[0].reward) == ("env_error", 0.0)
    assert good.episodes[0].reward == 1.0
    bad.trajectory("gen0")  # and it still travels
