"""The whole loop with the real parts: vLLM engine (CPU), ZeroMQ sockets, torchrun (2 ranks)."""

import json
import signal
import time
import urllib.request

import psutil
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from asyncrl.config import load_config
from asyncrl.learner.model import greedy_accuracy, load_policy, token_logprobs
from asyncrl.rewards import REWARD_FUNCTIONS
from asyncrl.task import load_task
from tests.conftest import free_base_port, wait_until
from tests.helpers.runs import STEPS, metrics_rows, run_overrides, start_run

pytestmark = pytest.mark.e2e



def _scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def _scrape_when_up(port, deadline):
    while time.monotonic() < deadline:
        try:
            return _scrape(port)
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"no /metrics on port {port}")


@pytest.fixture(scope="module")
def finished_run(model_cache, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    base = free_base_port()
    # Checkpoints at every evaluated version, so that the test below can evaluate the same
    # weights on the learner side (task.eval_size stays: it is part of the model cache's key).
    proc = start_run(run_overrides(model_cache, run_dir, base, **{"learner.checkpoint_interval": 2}))
    deadline = time.monotonic() + 300
    ports = {"buffer": base + 10, "gen0": base + 20, "learner0": base + 60, "learner1": base + 61}
    expositions = {name: _scrape_when_up(port, deadline) for name, port in ports.items()}
    out, _ = proc.communicate(timeout=600)
    return {"code": proc.returncode, "out": out, "run_dir": run_dir, "metrics": expositions}


def test_run_finishes_with_every_step_logged(finished_run):
    assert finished_run["code"] == 0, finished_run["out"]
    rows = metrics_rows(finished_run["run_dir"])
    assert [r["step"] for r in rows] == list(range(STEPS + 1))
    assert rows[0]["policy_version"] == 0 and "eval_accuracy" in rows[0]
    for r in rows[1:]:
        assert {"policy_version", "reward_mean", "staleness_mean"} <= r.keys()
        assert r["policy_version"] == r["step"]
    assert "eval_accuracy" in rows[2] and "eval_accuracy" in rows[STEPS]
    assert (finished_run["run_dir"] / "curves.png").stat().st_size > 10_000
    assert "[step 0/4] SFT policy" in finished_run["out"]


def test_the_generators_evaluation_of_a_version_is_that_of_its_checkpoint(finished_run):
    # Evaluation runs on the generator (greedy vLLM, among its training requests); the
    # learner-side transformers evaluation of checkpoint v must give the same accuracy as the
    # generator's evaluation of version v, so that evaluation used exactly v's weights.
    run_dir = finished_run["run_dir"]
    cfg = load_config(run_dir / "config.yaml")
    _, held_out = load_task(cfg.task)
    evaluated = {r["policy_version"]: r for r in metrics_rows(run_dir) if "eval_accuracy" in r}
    assert sorted(evaluated) == [0, 2, STEPS]
    learner_side = {}
    for v in evaluated:
        path = run_dir / "checkpoints" / f"step_{v}" if v else cfg.model.path  # 0: the SFT model
        model, tok = load_policy(path)
        learner_side[v] = greedy_accuracy(model, tok, held_out, cfg.generator.max_tokens,
                                          REWARD_FUNCTIONS[cfg.task.eval_reward])
    assert {v: r["eval_accuracy"] for v, r in evaluated.items()} == learner_side
    assert all(r["eval_by"] == "gen0" for r in evaluated.values())
    print("held-out accuracy by version:", learner_side)


def test_on_policy_mode_never_trains_on_stale_data(finished_run):
    rows = metrics_rows(finished_run["run_dir"])[1:]
    assert all(r["staleness_max"] == 0 for r in rows)


def test_on_fresh_data_the_first_minibatch_ratio_is_one(finished_run):
    # behaviour logprobs come from vLLM, current ones from transformers: equal within float
    # tolerance when the data is on-policy, so every token's ratio is 1 (+- 1e-3).
    for r in metrics_rows(finished_run["run_dir"])[1:]:
        assert abs(r["ratio_max"] - 1) < 1e-3 and abs(r["ratio_min"] - 1) < 1e-3, r


def test_generators_report_each_version_they_load(finished_run):
    probes = [json.loads(x) for x in (finished_run["run_dir"] / "sync_probe.jsonl").read_text().splitlines()]
    assert [p["policy_version"] for p in probes] == list(range(STEPS + 1))


def test_generator_logprobs_match_learner_after_sync(finished_run):
    run_dir = finished_run["run_dir"]
    probes = {p["policy_version"]: p for p in map(json.loads, (run_dir / "sync_probe.jsonl").read_text().splitlines())}
    model, _ = load_policy(run_dir / "checkpoints" / f"step_{STEPS}")
    model.eval()

    def learner_logprobs(probe):
        ids = torch.tensor([probe["prompt_tokens"] + probe["tokens"]])
        with torch.no_grad():
            lp = token_logprobs(model, ids, torch.ones_like(ids), probe["temperature"])
        return lp[0, len(probe["prompt_tokens"]) - 1 :]

    final = probes[STEPS]
    assert len(final["tokens"]) > 0
    diff = (learner_logprobs(final) - torch.tensor(final["logprobs"])).abs().max().item()
    assert diff < 1e-4, diff
    before = probes[0]  # the engine's logprobs before any sync, vs the final learner model
    diff0 = (learner_logprobs(before) - torch.tensor(before["logprobs"])).abs().max().item()
    assert diff0 > 1e-3, diff0


REQUIRED = {
    "buffer": ["asyncrl_buffer_trajectories_received", "asyncrl_buffer_occupancy_groups",
               "asyncrl_buffer_stale_dropped_trajectories"],
    "gen0": ["asyncrl_generator_generated_tokens", "asyncrl_generator_trajectories_sent",
             "asyncrl_generator_policy_version", "asyncrl_generator_reward_mean",
             "asyncrl_sync_receive_seconds"],
    "learner0": ["asyncrl_learner_steps", "asyncrl_learner_step_seconds",
                 "asyncrl_learner_policy_version", "asyncrl_learner_reward_mean",
                 "asyncrl_sync_broadcast_seconds"],
    "learner1": ["asyncrl_learner_steps"],
}


@pytest.mark.parametrize("role", sorted(REQUIRED))
def test_every_process_serves_valid_prometheus_exposition(finished_run, role):
    text = finished_run["metrics"][role]
    families = {f.name: f for f in text_string_to_metric_families(text)}
    missing = [n for n in REQUIRED[role] if n not in families]
    assert not missing, missing


def _running_run(model_cache, tmp_path, **extra):
    """A long run, returned once the learner has done a few steps, with all its processes."""
    proc = start_run(run_overrides(model_cache, tmp_path, free_base_port(),
                             **{"learner.total_steps": 1000, **extra}))
    deadline = time.monotonic() + 300
    while not (tmp_path / "metrics.jsonl").exists() or len(metrics_rows(tmp_path)) < 3:
        assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read()
        time.sleep(0.5)
    family = psutil.Process(proc.pid).children(recursive=True)
    # buffer, generator, torchrun agent and its 2 workers
    assert len(family) >= 5, [p.cmdline() for p in family]
    return proc, family


def _assert_all_gone(family):
    def alive():
        return [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    try:  # the launcher has exited; its roles may take a moment longer on a loaded machine
        wait_until(lambda: not alive(), 30, "every role's process gone after the launcher exited")
    except AssertionError:
        raise AssertionError([p.cmdline() for p in alive()]) from None


def test_killed_role_past_its_restarts_stops_the_run_and_leaves_no_orphans(model_cache,
                                                                           tmp_path):
    # With a restart budget the role would come back (tests/e2e/test_supervision.py).
    proc, family = _running_run(model_cache, tmp_path, **{"run.max_role_restarts": 0})
    gen = next(p for p in family if " asyncrl generator " in " ".join(p.cmdline()))
    gen.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "gen0 exited with code -9 after 0 restarts (run.max_role_restarts=0)" in out
    _assert_all_gone(family)


def test_ctrl_c_stops_every_process(model_cache, tmp_path):
    proc, family = _running_run(model_cache, tmp_path)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "stopping every role" in out
    _assert_all_gone(family)
