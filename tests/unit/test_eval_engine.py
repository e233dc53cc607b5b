"""generator.eval_engine without an engine: the learner's side (FileEvaluators under RemoteEvals,
through real files in a run directory), the evaluator's file protocol (pending requests,
results, bad files set aside), the config and the launcher's role, and the tied lm_head that
a directory load must give back (asyncrl/sync/weights.py dir_tensors)."""

import json

import pytest
import torch

from asyncrl.config import ConfigError, load_config
from asyncrl.generator import eval_engine as files
from asyncrl.launcher import role_commands
from asyncrl.learner.evals import FileEvaluators, RemoteEvals
from tests.helpers.evals import Rows


def _evals(run_dir, interval=2, total=4, timeout_s=100.0, now=lambda: 0.0):
    rows, accs, slept = Rows(), [], []
    ex = FileEvaluators(run_dir, sleep=slept.append)
    ev = RemoteEvals(ex, interval, total, timeout_s, rows, accs.append, clock=now)
    return ex, ev, rows, accs, slept


def _step(ex, ev, v, exported):
    if exported:
        ex.exported = v  # the learner wrote step_<v>/ (Whole.export_for_eval)
    ev.after_push(v)
    ev.add_row({"step": v, "policy_version": v})


def _answer(run_dir, v, accuracy):
    files.write_atomic(files.result_path(run_dir / "evals", v),
                       {"version": v, "accuracy": accuracy, "problems": 8, "seconds": 0.5})


def test_asks_are_files_and_answers_join_their_rows_in_order(tmp_path):
    ex, ev, rows, accs, slept = _evals(tmp_path)
    evals = tmp_path / "evals"
    _step(ex, ev, 0, exported=False)  # version 0: the run's model, nothing to write
    assert json.loads(files.ask_path(evals, 0).read_text()) == {"version": 0}
    _step(ex, ev, 1, exported=False)
    _step(ex, ev, 2, exported=True)
    assert files.pending_asks(evals) == [0, 2] and rows == []  # row 0 waits, the rest behind
    ev.poll(0.2)
    assert slept == [0.2] and rows == []  # nothing answered yet: it waited, nothing joined
    _answer(tmp_path, 0, 0.25)
    _answer(tmp_path, 2, 0.5)
    ev.poll()
    assert [(r["step"], r.get("eval_accuracy"), r.get("eval_by")) for r in rows] == [
        (0, 0.25, "evaluator"), (1, None, None), (2, 0.5, "evaluator")]
    assert accs == [0.25, 0.5] and files.pending_asks(evals) == []
    assert ev.hold_pushes is False  # Lead.push_due never holds a push for the evaluator


def test_a_version_not_written_yet_is_not_asked_for(tmp_path):
    ex, ev, rows, _, _ = _evals(tmp_path)
    _step(ex, ev, 0, exported=False)
    _answer(tmp_path, 0, 0.1)
    ev.poll()
    _step(ex, ev, 1, exported=False)
    _step(ex, ev, 2, exported=False)  # due, but its weights are not there: no ask
    assert files.pending_asks(tmp_path / "evals") == [] and 2 not in ev.pending
    _step(ex, ev, 3, exported=False)
    _step(ex, ev, 4, exported=True)  # the owed evaluation goes to the next version written
    assert files.pending_asks(tmp_path / "evals") == [4]


def test_an_unanswered_request_is_given_up_and_a_late_answer_not_joined(tmp_path):
    t = [0.0]
    ex, ev, rows, accs, _ = _evals(tmp_path, timeout_s=10.0, now=lambda: t[0])
    _step(ex, ev, 0, exported=False)
    t[0] = 11.0
    ev.check()
    assert [r["step"] for r in rows] == [0] and "eval_accuracy" not in rows[0]
    _answer(tmp_path, 0, 0.9)
    ev.poll()
    assert accs == [] and "eval_accuracy" not in rows[0]


def test_a_bad_result_file_is_not_joined(tmp_path):
    ex, ev, rows, accs, _ = _evals(tmp_path)
    _step(ex, ev, 0, exported=False)
    files.result_path(tmp_path / "evals", 0).write_text('{"version": 0, "accuracy": 7}')
    ev.poll()
    assert accs == [] and rows == []  # still pending: given up after weight_sync.timeout_s


def test_bad_requests_are_set_aside_not_fatal(tmp_path):
    evals = tmp_path / "evals"
    evals.mkdir()
    (evals / "ask_3.json").write_text('{"version": 4}')  # names another version
    (evals / "ask_x.json").write_text('{"version": 1}')
    (evals / "ask_5.json").write_bytes(b"\xff\x00")
    files.write_atomic(files.ask_path(evals, 6), {"version": 6})
    bad = []
    assert files.pending_asks(evals, lambda: bad.append(1)) == [6]
    assert len(bad) == 3 and sorted(p.name for p in evals.glob("*.bad")) == [
        "ask_3.json.bad", "ask_5.json.bad", "ask_x.json.bad"]


def test_config_and_the_launchers_role():
    cfg = load_config(None, ["generator.eval_engine=true"])
    assert cfg.generator.engines == cfg.generator.num_generators + 1
    assert "evaluator" in role_commands(cfg, "c.yaml")
    assert "evaluator" not in role_commands(load_config(None, []), "c.yaml")
    # on a GPU host the evaluator's devices come after the generators'
    with pytest.raises(ConfigError, match="as many more for the evaluator"):
        load_config(None, ["generator.eval_engine=true", "generator.device_ids=[0]",
                           "learner.device_ids=[1]"])
    load_config(None, ["generator.eval_engine=true", "generator.device_ids=[0,1]",
                       "learner.device_ids=[2]"])


def test_the_evaluator_command_refuses_a_run_without_eval_engine(capsys):
    from asyncrl.cli import main

    assert main(["evaluator", "--config", "configs/default.yaml"]) == 2
    assert "generator.eval_engine is false" in capsys.readouterr().err


def test_a_tied_lm_head_comes_back_from_a_directory(tmp_path):
    from safetensors.torch import save_file

    from asyncrl.sync.weights import dir_tensors

    embed = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    save_file({"model.embed_tokens.weight": embed}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    got = dict(dir_tensors(str(tmp_path)))
    assert set(got) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert torch.equal(got["lm_head.weight"], embed)
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": False}))
    assert set(dict(dir_tensors(str(tmp_path)))) == {"model.embed_tokens.weight"}
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        list(dir_tensors(str(tmp_path / "missing")))


class _Polled:
    def __init__(self):
        self.polls = 0
        self.expected, self.eval_results = ["gen0"], []

    def poll(self, timeout_s=0.0):
        self.polls += 1


def _lead(tmp_path, eval_engine):
    """Lead.push_due's state without its sockets: a sender, the evaluator's files or not,
    and one evaluation outstanding."""
    from asyncrl.learner.evals import GeneratorEvaluators
    from asyncrl.learner.lead import Lead

    lead = object.__new__(Lead)
    lead.sender, lead.push_owed = _Polled(), False
    lead.evaluators = (FileEvaluators(tmp_path) if eval_engine
                       else GeneratorEvaluators(lead.sender))
    lead.evals = RemoteEvals(lead.evaluators, 2, 4, 100.0, Rows(), lambda a: None)
    lead.evals.pending[0] = object()  # asked, not answered
    lead.evals.check = lambda: None
    return lead


def test_a_due_push_waits_for_a_generators_evaluation_not_for_the_evaluators(tmp_path):
    held = _lead(tmp_path / "a", eval_engine=False)
    assert held.push_due(True) is False and held.push_owed  # held back, still owed
    free = _lead(tmp_path / "b", eval_engine=True)
    assert free.push_due(True) is True and free.sender.polls == 1
    assert free.push_due(False) is True  # an owed push goes at the next sync


class _Engine:
    """What the evaluator uses of VLLMEngine: load_dir (a directory that exists and holds a
    weights file, else what vLLM's loader raises) and greedy generate."""

    def __init__(self):
        self.loads, self.weights = [], None

    def load_dir(self, path):
        from pathlib import Path

        if not list(Path(path).glob("*.safetensors")):
            raise FileNotFoundError(f"{path} holds no *.safetensors weights")
        self.loads.append(path)
        self.weights = Path(path).name
        return 0.01

    def generate(self, prompts, n, temperature, max_tokens):
        from types import SimpleNamespace

        assert n == 1 and temperature == 0.0
        # "right" on every problem under step_2's weights, "wrong" under any other
        return [[SimpleNamespace(tokens=[1 if self.weights == "step_2" else 0])]
                for _ in prompts]


def test_the_evaluator_answers_in_order_and_sets_aside_what_will_not_load(tmp_path):
    from prometheus_client import CollectorRegistry

    from asyncrl.generator.evaluate import Evaluator
    from asyncrl.metrics import EvaluatorMetrics

    evals, model = tmp_path / "evals", tmp_path / "model"
    for d in (files.weights_dir(evals, 2), model):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"")
    for v in (0, 2, 3):  # 3: asked, but its weights were never written
        files.write_atomic(files.ask_path(evals, v), {"version": v})
    engine, m = _Engine(), EvaluatorMetrics(CollectorRegistry())
    ev = Evaluator([[5], [6]], ["a", "b"], lambda ids: "right" if ids == [1] else "wrong",
                   lambda text, answer: float(text == "right"), 4)
    held, answered = files.answer_pending(evals, model, engine, ev, m, held=0)
    assert (held, answered) == (-1, 2)
    assert engine.loads == [str(files.weights_dir(evals, 2))]  # version 0: already held
    assert [files.read_result(files.result_path(evals, v))["accuracy"] for v in (0, 2)] == [
        0.0, 1.0]
    assert not files.weights_dir(evals, 2).exists()  # evaluated: its weights are dropped
    assert (evals / "ask_3.json.bad").exists() and files.pending_asks(evals) == []
    assert m.bad_asks._value.get() == 1 and m.evaluations._value.get() == 2
    # a failed load leaves no version whole: the next request reloads, even version 0's
    files.write_atomic(files.ask_path(evals, 4), {"version": 0})  # bad: names another
    files.write_atomic(files.ask_path(evals, 0), {"version": 0})
    files.result_path(evals, 0).unlink()
    assert files.answer_pending(evals, model, engine, ev, m, held) == (0, 1)
    assert engine.loads[-1] == str(model)
