"""`asyncrl run` on a run directory: an unfinished run is resumed with the settings it was
trained with, a finished one or one trained otherwise is refused naming why."""

import json
import os
from pathlib import Path

import pytest

from asyncrl.config import ConfigError, load_config, save_config
from asyncrl.runner import _check_same_training, resume_check, resume_point
from tests.conftest import asyncrl

DEFAULT = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"


def _saved(run_dir: Path, *overrides: str):
    cfg = load_config(DEFAULT, [f"run_dir={run_dir}", *overrides])
    save_config(cfg, run_dir / "config.yaml")
    return cfg


def test_a_new_directory_starts_a_run_and_an_unfinished_one_resumes(tmp_path):
    cfg = load_config(DEFAULT, [f"run_dir={tmp_path}"])
    assert resume_check(cfg, tmp_path) is False
    _saved(tmp_path)
    assert resume_check(cfg, tmp_path) is True
    assert resume_point(tmp_path) == "no checkpoint yet: from the start"
    (tmp_path / "checkpoints" / "step_4").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_4" / "asyncrl_state.json").write_text("{}")
    (tmp_path / "checkpoints" / "step_8").mkdir()  # incomplete: no asyncrl_state.json
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n"
                                                    for s in range(7)))
    assert resume_point(tmp_path) == ("checkpoint step 4, then the logged batches up to "
                                      "step 6 replayed")


def test_a_finished_run_and_a_stray_metrics_file_are_refused(tmp_path):
    cfg = _saved(tmp_path)
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds a finished run"):
        resume_check(cfg, tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match="no config.yaml"):
        resume_check(cfg, other)


def test_settings_that_change_training_are_refused_naming_each_key(tmp_path):
    saved = _saved(tmp_path)
    changed = load_config(DEFAULT, [f"run_dir={tmp_path}", "learner.lr=3e-4", "seed=5"])
    with pytest.raises(ConfigError) as e:
        _check_same_training(saved, changed, tmp_path)
    assert "learner.lr: 0.0001 in the run, 0.0003 now" in str(e.value)
    assert "seed: 0 in the run, 5 now" in str(e.value)
    # where and how the roles run may change: ports, timeouts, restarts, threads
    free = load_config(DEFAULT, [f"run_dir={tmp_path}", "net.base_port=48000",
                                 "learner.max_restarts=0", "weight_sync.timeout_s=60",
                                 "learner.threads=2", "run.max_role_restarts=5"])
    _check_same_training(saved, free, tmp_path)


def test_the_cli_refuses_a_finished_run_before_anything_starts(tmp_path):
    _saved(tmp_path)
    (tmp_path / "summary.json").write_text("{}")
    r = asyncrl("run", "configs/default.yaml", f"run_dir={tmp_path}", timeout=60)
    assert r.returncode == 2 and "holds a finished run" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_the_launcher_finds_every_descendant_even_in_sessions_of_their_own():
    """torchrun starts its workers with start_new_session: a SIGKILL of torchrun's group
    leaves them running, so _stop_all notes every descendant first and kills them too."""
    import subprocess
    import sys
    import time

    from asyncrl.launcher import _descendants

    child = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
             "'import time; time.sleep(60)'], start_new_session=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", child])
    try:
        deadline = time.monotonic() + 30
        while len(found := _descendants(proc.pid)) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(found) == 1
        (grandchild,) = found
        assert os.getsid(grandchild) != os.getsid(proc.pid)  # out of the group a killpg reaches
    finally:
        for pid in _descendants(proc.pid):
            os.kill(pid, 9)
        proc.kill()
        proc.wait()


def test_the_audit_counts_an_unacked_last_message_of_a_stopped_stream_as_never_kept():
    """The buffer journals a message before its durable record and acks it after: a run
    stopped in between leaves an accepted row nobody was told was kept. Only a stream's last
    message can be one; an earlier unacked one, or an acked one, missing is lost."""
    from asyncrl.audit import DeliveryAudit

    a = DeliveryAudit(remaining=set())
    a.accepted = {("gen0", "i1", 1, 0), ("gen0", "i1", 2, 0), ("gen0", "i2", 1, 0)}
    a.acked = {("gen0", "i1", 1, 0)}
    a.trained = [("gen0", "i1", 1, 0)]
    assert a.unacked_tail == {("gen0", "i1", 2, 0), ("gen0", "i2", 1, 0)}
    assert a.lost == set() and a.ok
    a.acked |= {("gen0", "i2", 1, 0)}  # acknowledged, then gone: lost
    assert a.lost == {("gen0", "i2", 1, 0)} and not a.ok
    a.accepted.add(("gen0", "i1", 3, 0))  # seq 2 is no longer the tail of i1
    a.acked.add(("gen0", "i1", 3, 0))
    a.trained.append(("gen0", "i1", 3, 0))
    assert ("gen0", "i1", 2, 0) in a.lost
