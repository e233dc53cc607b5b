"""bf16 end to end on the CPU: the engine in bf16, the learner with float32 master weights under
bf16 autocast, weights cast to bf16 as they are packed for sync; the run finishes with its
summary.json (a bf16 run once crashed at the end computing its checksum)."""

import json

import pytest

from tests.conftest import asyncrl, free_base_port

pytestmark = pytest.mark.e2e


def test_a_bf16_run_trains_syncs_and_finishes(model_cache, tmp_path):
    r = asyncrl("run", "configs/default.yaml", f"warm_start.cache_dir={model_cache}",
                f"run_dir={tmp_path}", f"net.base_port={free_base_port()}", "model.dtype=bfloat16",
                "learner.total_steps=4", "learner.eval_interval=4", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 4 and len(summary["final_weights_sha256"]) == 64
    probes = [json.loads(x) for x in (tmp_path / "sync_probe.jsonl").read_text().splitlines()]
    assert sorted({p["policy_version"] for p in probes}) == [0, 1, 2, 3, 4]  # every push loaded
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2, 3, 4]
    assert all(row.get("sync_s") for row in rows[1:])
