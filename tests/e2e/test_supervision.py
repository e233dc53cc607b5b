"""`asyncrl run` supervises its roles: a SIGKILLed generator or buffer is restarted and the run
finishes with exit 0, every group the buffer acknowledged trained exactly once (checked from the
run directory alone, `asyncrl audit`); past run.max_role_restarts the run stops naming the role
and the setting. Real vLLM, real sockets, real torchrun."""

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request

import pytest

from asyncrl.audit import delivery_audit
from asyncrl.config import load_config
from tests.conftest import ROOT, asyncrl, free_base_port, wait_until
from tests.helpers.runs import Output, pids

pytestmark = pytest.mark.e2e

STEPS = 24


def _start_run(model_cache, run_dir, *extra):
    base = free_base_port()
    extra = extra or ("run.restart_delay_s=0.5",)
    args = [f"warm_start.cache_dir={model_cache}", f"run_dir={run_dir}", f"net.base_port={base}",
            f"learner.total_steps={STEPS}", "learner.eval_interval=100",
            "learner.checkpoint_interval=100", "net.ready_timeout_s=120",
            *extra]
    load_config(ROOT / "configs" / "default.yaml", args)  # a bad override fails here, not later
    proc = subprocess.Popen([sys.executable, "-m", "asyncrl", "run", "configs/default.yaml",
                             *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    return proc, base


def _restarts(base) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{base + 5}/metrics", timeout=5).read()
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'asyncrl_run_role_restarts_total\{role="(\w+)"\} (\S+)', text.decode())}


def _gauge(base, port_offset, name) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{base + port_offset}/metrics",
                                  timeout=5).read().decode()
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def _kill(pid):
    os.killpg(pid, signal.SIGKILL)  # the role and anything it started


def _stop(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def test_killed_generator_then_buffer_are_restarted_and_nothing_is_lost(model_cache, tmp_path):
    # The buffer stays down 4 s (the first restart's delay): long enough for the streaming
    # generator to fill its send window with messages the dead buffer never acknowledged.
    proc, base = _start_run(model_cache, tmp_path, "run.restart_delay_s=4")
    window = load_config(ROOT / "configs" / "default.yaml").generator.send_window
    out = Output(proc)
    try:
        roles = pids(out.until(r"\[run\] started .*").group(0))
        out.until(r"\[step 5/")
        _kill(roles["gen0"])
        out.until(r"gen0 exited with code -9; restarting it .*restart 1 of "
                  r"run\.max_role_restarts=3")
        gen = int(out.until(r"gen0 restarted \(pid (\d+)\)").group(1))
        assert gen != roles["gen0"]
        assert _restarts(base) == {"buffer": 0.0, "gen0": 0.0, "learner": 0.0} | {"gen0": 1.0}
        out.until(r"\[step 15/")
        _kill(roles["buffer"])
        out.until(r"buffer exited with code -9; restarting it")
        # gen0's metrics (base + 20): the window fills and stays full while the buffer is down
        wait_until(lambda: _gauge(base, 20, "asyncrl_generator_unacked_messages") == window,
                   timeout_s=3.5, what=f"gen0's send window ({window} messages) to fill")
        out.until(r"buffer restarted")
        assert _restarts(base)["buffer"] == 1.0
        text = out.rest()
    finally:
        _stop(proc)
    assert proc.returncode == 0, text[-4000:]
    assert f"[step {STEPS}/{STEPS}]" in text
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(STEPS + 1))

    audit = delivery_audit(tmp_path)
    print(audit.summary())
    assert audit.duplicates == set() and audit.lost == set(), audit.summary()
    assert audit.acked_not_accepted == set(), audit.summary()
    assert audit.acked and audit.acked <= audit.accepted
    # Two incarnations of gen0 delivered groups that were trained, the second after the kill.
    incarnations = {inc for (_, inc, _, _) in audit.trained}
    assert len(incarnations) == 2, incarnations
    assert len(audit.trained) == STEPS * load_config(tmp_path / "config.yaml").learner.groups_per_step
    r = asyncrl("audit", str(tmp_path), timeout=120)
    assert r.returncode == 0 and "exactly once" in r.stdout, r.stdout + r.stderr


def test_past_the_restart_budget_the_run_stops_naming_role_and_setting(model_cache, tmp_path):
    proc, _ = _start_run(model_cache, tmp_path, "run.max_role_restarts=0")
    out = Output(proc)
    try:
        roles = pids(out.until(r"\[run\] started .*").group(0))
        out.until(r"\[step 5/")
        _kill(roles["buffer"])
        text = out.rest(timeout_s=120)
    finally:
        _stop(proc)
    assert proc.returncode != 0
    assert re.search(r"buffer exited with code -9 after 0 restarts \(run\.max_role_restarts=0\); "
                     r"stopping the other roles", text), text[-3000:]
