"""Batch generation (generator.streaming=false) never leaves the learner waiting: a generator
whose message waits on a full buffer still answers the evaluation the learner asks for, so the
run ends within seconds of its last step with the final evaluation in metrics.jsonl (it waited
weight_sync.timeout_s for it when the generator only resent). Real vLLM, sockets and torchrun."""

import json

import pytest

from tests.conftest import free_base_port
from tests.helpers.runs import start_run

pytestmark = pytest.mark.e2e

STEPS = 8


def test_batch_mode_ends_at_once_with_the_final_evaluation(model_cache, tmp_path):
    # The generator's calls are faster than the learner's steps, so the buffer (one step's
    # groups, buffer.admit_steps=1) is full when the last evaluation is asked.
    proc = start_run([f"warm_start.cache_dir={model_cache}", f"run_dir={tmp_path}",
                      f"net.base_port={free_base_port()}", "generator.streaming=false",
                      f"learner.total_steps={STEPS}", "learner.eval_interval=4",
                      "learner.checkpoint_interval=100", "weight_sync.timeout_s=120",
                      "net.ready_timeout_s=120"])
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(STEPS + 1))
    assert "eval_accuracy" in rows[4] and "eval_accuracy" in rows[STEPS], rows[STEPS]
    assert rows[STEPS]["eval_by"].startswith("gen")
    summary = json.loads((tmp_path / "summary.json").read_text())
    # From the last step to the end (its evaluation, the shutdown): seconds, not the
    # weight_sync.timeout_s a generator stuck resending made the learner wait.
    tail_s = summary["elapsed_s"] - rows[STEPS]["elapsed_s"]
    print(f"last step to the end of the run: {tail_s:.1f}s")
    assert tail_s < 30, tail_s
    log = (tmp_path / "logs" / "gen0.log").read_text()
    assert f"policy version {STEPS}: held-out accuracy" in log
