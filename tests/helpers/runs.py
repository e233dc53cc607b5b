"""Whole runs started from tests: the overrides of a short run, the launcher, metrics rows."""

import os
import re
import signal
import subprocess
import sys
import time

from asyncrl.jsonl import read_jsonl
from tests.conftest import ROOT, asyncrl

STEPS = 4  # learner.total_steps of the short runs (tests/e2e/test_loop.py)


def run_overrides(model_cache, run_dir, base_port, **extra):
    o = {"warm_start.cache_dir": model_cache, "learner.lr": 1e-3, "run_dir": run_dir,
         "net.base_port": base_port, "learner.total_steps": STEPS, "learner.nproc": 2,
         "learner.groups_per_step": 4, "generator.group_size": 4,
         "generator.prompts_per_call": 4, "generator.temperature": 0.7,
         "buffer.max_staleness": 0, "weight_sync.interval": 1, "learner.eval_interval": 2,
         "net.ready_timeout_s": 120, "weight_sync.timeout_s": 120}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def start_run(args):
    return subprocess.Popen([sys.executable, "-m", "asyncrl", "run", "configs/default.yaml", *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def metrics_rows(run_dir) -> list[dict]:
    return read_jsonl(run_dir / "metrics.jsonl")


class Output:
    """The launcher's stdout, read line by line; the role pids it announces (`pids`)."""

    def __init__(self, proc):
        self.proc, self.lines = proc, []

    def until(self, pattern, timeout_s=300):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"run ended before {pattern!r}:\n" + "".join(self.lines))
            self.lines.append(line)
            if m := re.search(pattern, line):
                return m
        raise AssertionError(f"no {pattern!r} within {timeout_s}s:\n" + "".join(self.lines))

    def rest(self, timeout_s=400):
        out, _ = self.proc.communicate(timeout=timeout_s)
        self.lines.append(out)
        return "".join(self.lines)


def pids(started_line: str) -> dict[str, int]:
    """Role name -> pid, from the launcher's "[run] started ..." line."""
    return {name: int(pid) for name, pid in re.findall(r"(\w+) \(pid (\d+)\)", started_line)}


def kill_session(proc) -> None:
    """The launcher and every role it started, killed whatever state the test left them in."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def assert_every_step_and_group_once(run_dir, steps: int) -> list[dict]:
    """Every step in metrics.jsonl once, in order, and the audit finding every acknowledged
    group trained exactly once (or dropped as stale, or held); the metrics rows."""
    rows = metrics_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(steps + 1))
    r = asyncrl("audit", str(run_dir), timeout=120)
    assert r.returncode == 0 and "exactly once" in r.stdout, r.stdout + r.stderr
    return rows
