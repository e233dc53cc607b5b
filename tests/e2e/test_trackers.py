"""run.trackers through a whole run: TensorBoard, wandb (offline) and MLflow (file store) hold
the learner's reward, accuracy and throughput series with every step once, in order, after a
learner rank was SIGKILLed and resumed by torchrun; the other roles' figures reach them too.
The same run with the three packages missing prints one line per tracker and finishes."""

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest

from asyncrl.config import load_config, save_config
from asyncrl.jsonl import read_jsonl
from tests.conftest import ROOT, free_base_port
from tests.helpers.trackers import mlflow_series, tensorboard_series, wandb_history, wandb_series

pytestmark = pytest.mark.e2e

STEPS = 10
TRACKERS = "run.trackers=[tensorboard,wandb,mlflow]"


def _config(model_cache, run_dir, *extra):
    cfg = load_config(ROOT / "configs" / "default.yaml", [
        f"warm_start.cache_dir={model_cache}", f"run_dir={run_dir}",
        f"net.base_port={free_base_port()}", f"learner.total_steps={STEPS}",
        "learner.checkpoint_interval=4", "learner.eval_interval=4", "net.ready_timeout_s=120",
        "run.wandb_mode=offline", "run.tracker_interval_s=1", *extra])
    path = run_dir / "run.yaml"
    save_config(cfg, path)
    return path


def _start(path, *prelude):
    code = "".join(prelude) + "from asyncrl.cli import main; sys.exit(main())"
    return subprocess.Popen([sys.executable, "-c", f"import sys\n{code}", "run", str(path)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


@pytest.mark.slow  # ~1 minute, a learner restart included: CI's second pytest call runs it
def test_three_trackers_hold_every_step_once_after_a_learner_restart(model_cache, tmp_path):
    for mod in ("tensorboard", "wandb", "mlflow"):
        pytest.importorskip(mod)
    run = _start(_config(model_cache, tmp_path, TRACKERS, "learner.max_restarts=1"))
    try:
        deadline = time.monotonic() + 400
        while not any(r["step"] >= 6 for r in read_jsonl(tmp_path / "metrics.jsonl")):
            assert time.monotonic() < deadline and run.poll() is None, run.poll()
            time.sleep(0.2)
        family = psutil.Process(run.pid).children(recursive=True)
        worker = next(p for p in family if "asyncrl.learner" in " ".join(p.cmdline())
                      and "torch.distributed.run" not in " ".join(p.cmdline()))
        worker.send_signal(signal.SIGKILL)
        out, _ = run.communicate(timeout=400)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, out[-3000:]
    assert "the learner restarted and resumed from its checkpoint" in out, out[-3000:]
    assert "[run] tracker" not in out, out[-3000:]

    rows = read_jsonl(tmp_path / "metrics.jsonl")
    want = {r["step"]: r for r in rows}
    assert sorted(want) == list(range(STEPS + 1))
    evaluated = sorted(s for s, r in want.items() if "eval_accuracy" in r)
    assert 0 in evaluated and STEPS in evaluated
    for reader in (tensorboard_series, wandb_series, mlflow_series):
        reward = reader(tmp_path, "reward_mean")
        assert [s for s, _ in reward] == list(range(1, STEPS + 1)), reader.__name__
        # A replayed step keeps what was first logged for it; the evaluation a resumed
        # learner owes may join a replayed row (metrics.jsonl), not the trackers.
        acc = dict(reader(tmp_path, "eval_accuracy"))
        assert {0, STEPS} <= set(acc) <= set(evaluated), (reader.__name__, acc, evaluated)
        for s, value in acc.items():
            assert value == pytest.approx(want[s]["eval_accuracy"]), (reader.__name__, s)
        assert [s for s, _ in reader(tmp_path, "tokens_per_s")] == list(range(1, STEPS + 1))
        # The generator's and buffer's figures, one row per interval for all generators.
        assert reader(tmp_path, "generator/generated_tokens_total"), reader.__name__
        assert reader(tmp_path, "buffer/trajectories_received_total"), reader.__name__
    # wandb keeps each step once, in order (it refuses a step lower than one it has).
    steps = [r["_step"] for r in wandb_history(tmp_path)]
    assert steps == sorted(steps)
    state = json.loads((tmp_path / "trackers" / "state.json").read_text())
    assert state["upto"] == STEPS


def test_trackers_not_installed_are_one_line_each_and_the_run_finishes(model_cache, tmp_path):
    path = _config(model_cache, tmp_path, TRACKERS, "learner.total_steps=3")
    hide = ("for m in ('tensorboard', 'torch.utils.tensorboard', 'wandb', 'mlflow', "
            "'mlflow.tracking'): sys.modules[m] = None\n")
    run = _start(path, hide)
    out, _ = run.communicate(timeout=600)
    assert run.returncode == 0, out[-3000:]
    lines = [x for x in out.splitlines() if x.startswith("[run] tracker")]
    assert len(lines) == 3, out[-3000:]
    for name, line in zip(("tensorboard", "wandb", "mlflow"), lines):
        assert line.startswith(f"[run] tracker {name} is in run.trackers but not installed")
    assert "Traceback" not in out and "ERROR" not in out
    assert (tmp_path / "summary.json").is_file()
