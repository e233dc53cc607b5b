"""rm.rounds with the real loop: `asyncrl train-rm` trains the first reward model, runs a round's
RL through `asyncrl run` (real engine, the reward service serving that model, real sockets),
has the raters label its checkpoints' samples and fine-tunes on them; run again, it trains
nothing (every part is kept). Slow: a whole RLHF run inside."""

import json
import subprocess
import sys

import pytest

from asyncrl.config import load_config
from tests.conftest import ROOT, free_base_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_a_round_runs_rl_against_the_last_reward_model_and_learns_from_its_policies(
        model_cache, tmp_path):
    out = tmp_path / "rm"
    cmd = [sys.executable, "-m", "asyncrl", "train-rm", "configs/rlhf.yaml",
           f"warm_start.cache_dir={model_cache}", "rm.base=", "rm.pairs=64", "rm.steps=4",
           "rm.eval_interval=4", "rm.rounds=1", "rm.round_pairs=64", "rm.round_steps=4",
           "learner.total_steps=4", "learner.eval_interval=100", "learner.checkpoint_interval=2",
           "task.eval_size=16", f"net.base_port={free_base_port()}", "net.ready_timeout_s=180",
           f"rm.out={out}"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    work = tmp_path / "rm.rounds"
    run = work / "round-1" / "run"
    assert "[rm round 1] [run] learner finished" in r.stdout, r.stdout[-3000:]
    assert (run / "summary.json").is_file() and (run / "win_rate.json").is_file()
    saved = load_config(run / "config.yaml")
    assert saved.task.reward_model == str(work / "round-0") and saved.reward.service
    assert saved.rm.rounds == 0 and saved.learner.total_steps == 4
    checkpoints = sorted((run / "checkpoints").glob("step_*"))
    assert checkpoints, list(run.iterdir())
    files = sorted((work / "round-1").glob("pairs-*.train.jsonl"))
    assert [f.name.split(".")[0] for f in files] == [f"pairs-{c.name}" for c in checkpoints]
    pairs = [json.loads(x) for f in files for x in f.read_text().splitlines()]
    assert len(pairs) >= 64 and all(p["chosen"] != p["rejected"] for p in pairs)
    tuned = json.loads((work / "round-1" / "rm" / "train_rm.json").read_text())
    assert tuned["base"] == str(work / "round-0") and tuned["steps"] == 4
    assert tuned["train_rows"] == 64 + len(pairs)  # the SFT policy's pairs and the round's
    report = json.loads((out / "rounds.json").read_text())
    assert report[0]["round"] == 1 and set(report[0]["agreement"]) == {"SFT policy", "round 1"}
    assert (out / "config.json").is_file() and "[train-rm] 1 round(s)" in r.stdout

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "[rm round" not in again.stdout and "[rm rounds]" not in again.stdout, again.stdout
