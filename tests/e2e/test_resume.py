"""A run survives whatever stops it, from the command users already ran: a SIGKILLed learner
rank under the default settings is restarted by torchrun; a Ctrl-C of `asyncrl run` or a
SIGKILL of every process (a machine reboot) is resumed by running the same command again. The
run ends with the weights an uninterrupted run would have (`asyncrl replay`) and every group
the buffer acknowledged trained exactly once (`asyncrl audit`). Real vLLM, sockets, torchrun."""

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest

from asyncrl.audit import delivery_audit
from tests.conftest import ROOT, asyncrl, free_base_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STEPS = 14


def _rows(run_dir):
    p = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x] if p.is_file() else []


def _start(args):
    return subprocess.Popen([sys.executable, "-m", "asyncrl", "run", "configs/default.yaml",
                             *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for_step(run_dir, step, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while not any(r["step"] >= step for r in _rows(run_dir)):
        assert time.monotonic() < deadline, f"no step {step} within {timeout}s"
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.2)


def _learner_worker(proc):
    return next(p for p in psutil.Process(proc.pid).children(recursive=True)
                if "asyncrl.learner" in " ".join(p.cmdline())
                and "torch.distributed.run" not in " ".join(p.cmdline()))


def _kill_everything(proc):
    """What a reboot does: every process of the run dies at once, nobody cleans up."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:  # the launcher has exited, and stopped its roles first
        proc.wait()
        return
    for p in family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(family, timeout=30)


def test_killed_rank_ctrl_c_and_reboot_all_resume_to_the_uninterrupted_weights(model_cache,
                                                                               tmp_path):
    run_dir = tmp_path / "run"
    args = [f"warm_start.cache_dir={model_cache}", f"run_dir={run_dir}",
            f"net.base_port={free_base_port()}", f"learner.total_steps={STEPS}",
            "learner.checkpoint_interval=4", "learner.eval_interval=7",
            "net.ready_timeout_s=120", "run.restart_delay_s=0.5"]
    outs = []
    # 1. A learner rank SIGKILLed under the default settings: torchrun restarts it.
    proc = _start(args)
    try:
        _wait_for_step(run_dir, 5, proc)
        _learner_worker(proc).send_signal(signal.SIGKILL)
        # 2. Ctrl-C of `asyncrl run` itself, later on.
        _wait_for_step(run_dir, 8, proc)
        proc.send_signal(signal.SIGINT)
        outs.append(proc.communicate(timeout=120)[0])
    finally:
        _kill_everything(proc)
    assert proc.returncode == 130, outs[-1][-3000:]
    assert "the learner restarted and resumed from its checkpoint at step 4" in outs[-1]
    stopped_at = max(r["step"] for r in _rows(run_dir))
    assert stopped_at < STEPS

    # A setting that changes training is refused, naming it, before anything starts.
    r = asyncrl("run", "configs/default.yaml", *args, "learner.lr=5e-4", timeout=120)
    assert r.returncode == 2 and "learner.lr: 0.0001 in the run, 0.0005 now" in r.stderr, (
        r.stdout + r.stderr)

    # 3. The same command resumes; then every process is SIGKILLed (a reboot) ...
    proc = _start(args)
    try:
        _wait_for_step(run_dir, stopped_at + 3, proc)
    finally:
        _kill_everything(proc)
    outs.append(proc.stdout.read())
    assert f"[run] resuming the unfinished run in {run_dir}: checkpoint step" in outs[-1]
    # ... and the same command again finishes the run.
    proc = _start(args)
    try:
        outs.append(proc.communicate(timeout=400)[0])
    finally:
        _kill_everything(proc)
    assert proc.returncode == 0, outs[-1][-3000:]
    assert "[run] resuming the unfinished run" in outs[-1]

    # Each step once in metrics.jsonl, row 0 (the SFT policy) and the last evaluated.
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == list(range(STEPS + 1)), [r["step"] for r in rows]
    assert "eval_accuracy" in rows[0] and "eval_accuracy" in rows[STEPS]
    assert (run_dir / "curves.png").is_file() and (run_dir / "summary.json").is_file()
    # The weights an uninterrupted run on the same batches has.
    r = asyncrl("replay", str(run_dir), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{STEPS} steps ({STEPS} in metrics.jsonl), largest loss difference 0;" in r.stdout
    # Every acknowledged group trained exactly once (or dropped as stale, or still held).
    audit = delivery_audit(run_dir)
    assert audit.ok and not audit.lost and not audit.duplicates, audit.summary()
    r = asyncrl("audit", str(run_dir), timeout=120)
    assert r.returncode == 0 and "exactly once" in r.stdout, r.stdout + r.stderr
    # A finished run is not run again.
    r = asyncrl("run", "configs/default.yaml", *args, timeout=120)
    assert r.returncode == 2 and "holds a finished run" in r.stderr, r.stderr
