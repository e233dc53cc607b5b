"""Strict synchronous mode, and replaying a finished run on the learner alone."""

import json

import pytest

from tests.conftest import asyncrl, free_base_port

pytestmark = pytest.mark.e2e


def _run(model_cache, run_dir, *extra):
    r = asyncrl("run", "configs/default.yaml", f"warm_start.cache_dir={model_cache}",
                f"run_dir={run_dir}", f"net.base_port={free_base_port()}",
                "learner.total_steps=4", "learner.eval_interval=2", *extra, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sync_mode_is_on_policy_and_wastes_nothing(model_cache, tmp_path):
    rows = _run(model_cache, tmp_path, "generator.on_policy=true", "buffer.max_staleness=0")
    for r in rows[1:]:
        assert r["staleness_max"] == 0 and set(r["staleness_tokens"]) == {"0"}
        # the generator waited for each new version, so nothing was generated to be dropped
        assert r["stale_dropped_total"] == 0
    admitted = [json.loads(x) for x in (tmp_path / "admission.jsonl").read_text().splitlines()]
    assert [a["step"] for a in admitted] == [1, 2, 3, 4]
    assert all(g[2] == a["step"] - 1 for a in admitted for g in a["groups"])  # policy version


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_async_run_replays_to_the_same_weights(model_cache, tmp_path, strategy):
    # fsdp on one rank: nothing to shard, but its checkpoints are sharded ones and the
    # hub-format weights are exported at the end.
    rows = _run(model_cache, tmp_path, "buffer.max_staleness=2", "buffer.admit_steps=2",
                "learner.offpolicy=decoupled", f"learner.strategy={strategy}")
    if strategy == "fsdp":
        assert (tmp_path / "export" / "final" / "model.safetensors").is_file()
        assert (tmp_path / "checkpoints" / "step_4" / "sharded" / ".metadata").is_file()
    assert any(r["staleness_max"] > 0 for r in rows[1:])  # really off-policy data
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 99, "lo')  # a torn last line (a learner killed mid-write)
    r = asyncrl("replay", str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "==" in r.stdout
    # and a replay that trains on different data does not match
    log = tmp_path / "batches" / "rank0.bin"
    data = log.read_bytes()
    n = int.from_bytes(data[:8], "little")
    log.write_bytes(data[8 + n :] + data[: 8 + n])  # first batch moved to the end
    r = asyncrl("replay", str(tmp_path), timeout=300)
    assert r.returncode == 1 and "!=" in r.stdout
