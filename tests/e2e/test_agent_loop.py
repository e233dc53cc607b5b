"""Multi-turn episodes through the whole loop (real vLLM engine, sockets, torchrun): the
calculator environment with episodes whose environment raises, hangs past
env.step_timeout_s, or takes a second per step (a slow tool); the run finishes, every failure
is counted by reason, the engine stays busy while tools sleep, metrics.jsonl carries the
episode figures and the held-out evaluation runs episodes, and episodes.png is drawn."""

import json
import subprocess
import sys

import pytest

from asyncrl.jsonl import read_jsonl
from tests.conftest import ROOT, free_base_port

pytestmark = pytest.mark.e2e


def test_episodes_with_failing_and_slow_tools_train_and_are_counted(model_cache, tmp_path):
    args = [f"warm_start.cache_dir={model_cache}", f"run_dir={tmp_path}",
            f"net.base_port={free_base_port()}", "learner.total_steps=4",
            "learner.eval_interval=4", "learner.groups_per_step=8", "generator.group_size=4",
            "env.name=tests.helpers.envs:Flaky", "env.kwargs={slow_s: 1.0}",
            "env.step_timeout_s=2", "generator.max_tokens=6", "generator.max_turns=3",
            "generator.max_episode_tokens=64",
            "net.ready_timeout_s=120"]
    r = subprocess.run([sys.executable, "-m", "asyncrl", "run", "configs/default.yaml", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [row["step"] for row in rows] == [0, 1, 2, 3, 4]
    assert all("episode_turns" in row for row in rows[1:])
    assert 1.0 <= rows[-1]["episode_turns"] <= 3.0
    assert "eval_accuracy" in rows[0] and "eval_accuracy" in rows[-1]
    stats = json.loads((tmp_path / "gen0_stats.json").read_text())
    reasons = stats["finish_reasons"]
    assert reasons.get("env_error", 0) > 0 and reasons.get("env_timeout", 0) > 0, reasons
    assert stats["episodes"] == sum(reasons.values()) and stats["env_s"] > 0
    # While tools slept (a second per step) and hung, the engine kept running the others.
    print(f"engine busy fraction with slow and hanging tools: "
          f"{stats['engine_busy_fraction']:.2f}, env seconds {stats['env_s']:.0f}")
    assert stats["engine_busy_fraction"] > 0.05
    assert (tmp_path / "episodes.png").read_bytes()[:4] == b"\x89PNG"
