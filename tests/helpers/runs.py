"""Whole runs started from tests: the overrides of a short run, the launcher, metrics rows."""

import subprocess
import sys

from asyncrl.jsonl import read_jsonl
from tests.conftest import ROOT

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
