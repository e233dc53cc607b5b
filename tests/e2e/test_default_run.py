"""The README's main command, to completion: RL must beat the SFT warm start by 10 points."""

import json

import pytest

from tests.conftest import asyncrl, free_base_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_default_run_raises_held_out_accuracy_by_ten_points(model_cache, tmp_path):
    r = asyncrl("run", "configs/default.yaml", f"run_dir={tmp_path}",
                f"warm_start.cache_dir={model_cache}", f"net.base_port={free_base_port()}",
                timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [x["eval_accuracy"] for x in rows if "eval_accuracy" in x]
    assert rows[0]["step"] == 0 and "eval_accuracy" in rows[0]
    print(f"SFT {evals[0]:.3f} -> final {evals[-1]:.3f}, best {max(evals):.3f}")
    assert evals[-1] >= evals[0] + 0.10, evals
    assert (tmp_path / "curves.png").exists()
