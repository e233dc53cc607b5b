"""The reward service with real engines, real sockets and real keys: its scores (vLLM's
pooling runner, in the `asyncrl reward` role) equal transformers' scores of the same texts
within 1e-4; a peer without the run's keys is refused and counted, a generator's garbage is
rejected and counted, and the role goes on answering. Then, slow-marked: a SIGKILLed reward
service inside `asyncrl run` is restarted, and every group is trained exactly once."""

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request

import pytest

from asyncrl import transport, wire
from asyncrl.cli import main
from asyncrl.config import load_config, save_config
from asyncrl.rewards import RewardModelScorer
from asyncrl.testing import build_tiny_model
from tests.conftest import ROOT, free_base_port, wait_until
from tests.helpers.runs import Output, assert_every_step_and_group_once, kill_session, pids

pytestmark = pytest.mark.e2e
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    """A reward model trained for a few steps from the tiny Llama's shape (a preference for
    answers ending in 7), so its scores differ by text."""
    d = tmp_path_factory.mktemp("rm")
    base = build_tiny_model(d / "base")
    pairs = d / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"{i:02d}+{i:02d}=", "chosen": f"{i}7",
                                         "rejected": f"{i}3"}) + "\n" for i in range(40)))
    assert main(["train-rm", "configs/default.yaml", f"model.path={base}", f"rm.data={pairs}",
                 f"rm.out={d / 'rm'}", "rm.steps=10", "rm.eval_interval=10"]) == 0
    return d / "rm"


PROMPTS = ["07+45=", "07+45=", "99+99=", "10+01=", "33+44="]
TEXTS = ["52", "42", "198 and some more text to make it longer", "11", "77"]


def _metrics(port) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def test_the_service_scores_as_transformers_does_and_refuses_strangers(tiny_rm, tmp_path):
    base = free_base_port()
    cfg = load_config(ROOT / "configs" / "default.yaml", [
        f"run_dir={tmp_path}", f"net.base_port={base}", f"task.reward_model={tiny_rm}",
        "reward.service=true", "model.path=" + str(tiny_rm)])
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    transport.make_keys(tmp_path / "keys")
    role = subprocess.Popen([sys.executable, "-m", "asyncrl", "reward", "--config", str(path)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        ctx = transport.context()
        keys = transport.load_keys(tmp_path / "keys", "gen0")
        gen = transport.Client(ctx, "127.0.0.1", cfg.net.reward_port, "gen0", keys)
        ask = wire.encode("score_request", 0, sender="gen0", incarnation="i", seq=1,
                          prompts=PROMPTS, completions=TEXTS)
        reply = wait_until(lambda: gen.request(ask, timeout_s=5), 180, "the reward role's answer")
        got = wire.decode(reply)
        want = RewardModelScorer(tiny_rm).score(PROMPTS, TEXTS)
        assert got.status == "ok" and got.seq == 1
        assert max(abs(a - b) for a, b in zip(got.scores, want)) < TOL, (got.scores, want)
        assert len(set(round(x, 4) for x in want)) > 1  # the texts really score differently

        # A peer without the keys gets nothing and is counted; garbage from a generator's key
        # is rejected and counted; the role still answers.
        stranger = transport.Client(ctx, "127.0.0.1", cfg.net.reward_port, "x")
        assert stranger.request(ask, timeout_s=2) is None
        bad = wire.decode(gen.request(b"\x00\x01garbage", timeout_s=10))
        assert (bad.status, bad.seq) == ("rejected", -1)
        again = wire.decode(gen.request(ask, timeout_s=10))
        assert again.scores == got.scores
        page = _metrics(cfg.net.reward_metrics_port)
        assert re.search(r'asyncrl_reward_auth_failures_total\{.*\} [1-9]', page), page
        assert re.search(r'asyncrl_reward_messages_rejected_total\{reason="bad_magic"\} 1', page)
        assert re.search(r'asyncrl_reward_requests_total\{status="ok"\} 2', page)
    finally:
        os.killpg(role.pid, signal.SIGKILL)
        out, _ = role.communicate()
    assert "Traceback" not in out, out[-3000:]


@pytest.mark.slow
def test_a_killed_reward_service_is_restarted_and_no_group_is_lost(model_cache, tiny_rm,
                                                                   tmp_path):
    steps = 16
    args = [f"warm_start.cache_dir={model_cache}", f"run_dir={tmp_path}",
            f"net.base_port={free_base_port()}", f"learner.total_steps={steps}",
            "learner.eval_interval=100", "learner.checkpoint_interval=100",
            "net.ready_timeout_s=120", f"task.reward_model={tiny_rm}", "reward.service=true",
            "reward.timeout_s=3", "run.restart_delay_s=2"]
    proc = subprocess.Popen([sys.executable, "-m", "asyncrl", "run", "configs/default.yaml",
                             *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    out = Output(proc)
    try:
        roles = pids(out.until(r"\[run\] started .*").group(0))
        assert "reward" in roles, roles
        out.until(r"\[step 5/")
        os.killpg(roles["reward"], signal.SIGKILL)
        out.until(r"reward exited with code -9; restarting it")
        out.until(r"reward restarted")
        text = out.rest(timeout_s=600)
    finally:
        kill_session(proc)
    assert proc.returncode == 0, text[-4000:]
    rows = assert_every_step_and_group_once(tmp_path, steps)
    assert all("reward_reward_model" in r for r in rows[1:]), rows[1]
    gen_log = (tmp_path / "logs" / "gen0.log").read_text()
    assert "Traceback" not in gen_log, gen_log[-3000:]
