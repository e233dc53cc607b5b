"""Roles started as separate commands, in reverse order (learner, generator, buffer), find each
other through the addresses in one config file and train, as they would on separate hosts."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from asyncrl.config import load_config, save_config
from asyncrl.transport import make_keys
from tests.conftest import ROOT, free_base_port

pytestmark = pytest.mark.e2e


def test_role_commands_started_in_any_order_train_together(model_cache, tmp_path):
    cfg = load_config(ROOT / "configs" / "default.yaml", [
        f"warm_start.cache_dir={model_cache}", f"run_dir={tmp_path}",
        f"net.base_port={free_base_port()}", "learner.total_steps=3", "learner.eval_interval=3",
        "net.ready_timeout_s=120"])
    path = tmp_path / "run.yaml"
    save_config(cfg, path)
    make_keys(tmp_path / "keys")  # roles started on their own read RUN_DIR/keys
    procs = {}
    try:
        for role, extra in (("learner", []), ("generator", ["--index", "0"]), ("buffer", [])):
            log = (tmp_path / f"{role}.log").open("w")
            procs[role] = subprocess.Popen(
                [sys.executable, "-m", "asyncrl", role, "--config", str(path), *extra],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            time.sleep(5)  # each role is up (or waiting) before the next one starts
        assert procs["learner"].wait(timeout=400) == 0, (tmp_path / "learner.log").read_text()[-3000:]
    finally:
        for p in procs.values():
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the role and anything it started
            except ProcessLookupError:
                pass
            p.wait()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[-1]["policy_version"] == 3 and "eval_accuracy" in rows[-1]
