"""configs/reasoning.yaml end to end (issue 13's workload): a long tail of completion lengths in
what the learner trained, its histogram and percentiles in the run directory, and at least 10
points of held-out accuracy gained by RL. The first run builds builtin:tiny-reasoning (about
15 minutes on 2 cores), later ones reuse it from the cache."""

import json

import pytest

from tests.conftest import asyncrl, free_base_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.long]


def test_reasoning_run_has_a_long_tail_and_gains_ten_points(tmp_path):
    r = asyncrl("run", "configs/reasoning.yaml", f"run_dir={tmp_path}",
                f"net.base_port={free_base_port()}", timeout=3600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [x["eval_accuracy"] for x in rows if "eval_accuracy" in x]
    summary = json.loads((tmp_path / "summary.json").read_text())
    lengths = summary["completion_tokens"]
    print(f"SFT {evals[0]:.3f} -> final {evals[-1]:.3f}; lengths {lengths}")
    assert lengths["p50"] >= 30 and lengths["p90"] >= 4 * lengths["p10"], lengths
    assert (tmp_path / "lengths.png").stat().st_size > 0
    assert (tmp_path / "curves.png").exists()
    assert evals[-1] >= evals[0] + 0.10, evals
