"""generator.eval_engine end to end: a real run (vLLM on CPU, ZeroMQ, torchrun with 2 FSDP
ranks, whose export of each evaluated version is a gather) with the evaluator process next to
the generator. Its evaluation of version v must be that of v's weights, and no push may be held
back for it."""

import json
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from asyncrl.config import load_config
from asyncrl.learner.model import greedy_accuracy, load_policy
from asyncrl.rewards import REWARD_FUNCTIONS
from asyncrl.task import load_task
from tests.conftest import free_base_port
from tests.helpers.runs import STEPS, metrics_rows, run_overrides, start_run

# slow: two vLLM engines and two FSDP ranks (~1 min); CI runs it with the slow suite, which
# keeps the default run under its 20 minutes.
pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def evaluated_run(model_cache, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    base = free_base_port()
    # Hub-format exports at every evaluated version (fsdp checkpoints are sharded), so that
    # the learner side can evaluate the same weights.
    proc = start_run(run_overrides(model_cache, run_dir, base, **{
        "generator.eval_engine": "true", "learner.strategy": "fsdp",
        "learner.export_interval": 2}))
    deadline, scrape = time.monotonic() + 300, None
    while scrape is None and time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{base + 6}/metrics", timeout=5) as r:
                scrape = r.read().decode()
        except OSError:
            time.sleep(0.5)
    out, _ = proc.communicate(timeout=600)
    return {"code": proc.returncode, "out": out, "run_dir": run_dir, "scrape": scrape}


def test_the_evaluators_evaluation_of_a_version_is_that_of_its_weights(evaluated_run):
    assert evaluated_run["code"] == 0, evaluated_run["out"]
    run_dir = evaluated_run["run_dir"]
    rows = metrics_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(STEPS + 1))
    evaluated = {r["policy_version"]: r for r in rows if "eval_accuracy" in r}
    assert sorted(evaluated) == [0, 2, STEPS]
    assert all(r["eval_by"] == "evaluator" for r in evaluated.values())
    cfg = load_config(run_dir / "config.yaml")
    _, held_out = load_task(cfg.task)
    learner_side = {}
    for v in evaluated:
        path = (cfg.model.path if v == 0 else run_dir / "export"
                / ("final" if v == STEPS else f"step_{v}"))
        model, tok = load_policy(path)
        learner_side[v] = greedy_accuracy(model, tok, held_out, cfg.generator.max_tokens,
                                          REWARD_FUNCTIONS[cfg.task.eval_reward])
    assert {v: r["eval_accuracy"] for v, r in evaluated.items()} == learner_side
    print("held-out accuracy by version:", learner_side)


def test_no_generator_evaluates_and_every_push_goes_out(evaluated_run):
    # The generator is never asked (its engine only trains), and with weight_sync.interval=1 every
    # step's push goes out: none is held back for an evaluation (tests/unit/test_eval_engine.py
    # checks Lead.push_due itself; a generator's evaluation holds pushes only when it is
    # still running at the next step, which this short run may not show either way).
    run_dir = evaluated_run["run_dir"]
    assert json.loads((run_dir / "gen0_stats.json").read_text())["evals"] == 0
    rows = metrics_rows(run_dir)
    assert all(r["sync_s"] is not None for r in rows[1:]), [r["sync_s"] for r in rows[1:]]


def test_the_evaluator_cleans_up_and_exports_its_metrics(evaluated_run):
    evals = evaluated_run["run_dir"] / "evals"
    assert sorted(p.name for p in evals.glob("result_*.json")) == [
        f"result_{v}.json" for v in sorted([0, 2, STEPS])]
    assert not list(evals.glob("step_*")) and not list(evals.glob("*.bad"))
    assert evaluated_run["scrape"] is not None, "no /metrics on net.base_port + 6"
    names = {f.name for f in text_string_to_metric_families(evaluated_run["scrape"])}
    assert {"asyncrl_evaluator_evaluations", "asyncrl_evaluator_backlog"} <= names
