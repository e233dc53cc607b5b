"""configs/agent.yaml to completion: multi-turn episodes with the calculator tool, warm start
built here when not cached (about 6 minutes), then 100 RL steps. RL must gain at least 10
points of held-out accuracy within 15 minutes of RL, the model must come to use the tool more,
and RUN_DIR/episodes.png must show it."""

import json

import pytest

from tests.conftest import asyncrl, free_base_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_the_agentic_task_learns_to_use_its_tool(model_cache, tmp_path):
    r = asyncrl("run", "configs/agent.yaml", f"run_dir={tmp_path}",
                f"warm_start.cache_dir={model_cache}", f"net.base_port={free_base_port()}",
                timeout=2400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [(x["eval_accuracy"], x["elapsed_s"]) for x in rows if "eval_accuracy" in x]
    first, (last, elapsed) = evals[0][0], evals[-1]
    print(f"SFT {first:.3f} -> final {last:.3f} in {elapsed:.0f}s of RL")
    assert last >= first + 0.10 and elapsed <= 900, evals
    turns = [x["episode_turns"] for x in rows if "episode_turns" in x]
    assert sum(turns[-10:]) / 10 > sum(turns[:10]) / 10, turns
    assert all(0.0 <= x["tool_success"] <= 1.0 for x in rows if "tool_success" in x)
    assert (tmp_path / "episodes.png").read_bytes()[:4] == b"\x89PNG"
