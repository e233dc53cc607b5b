"""Processes killed mid-run come back and the run goes on: a learner rank under torchrun
--max-restarts resumes from its checkpoint with the same batches and re-forms the weight-sync
session with the running generator; a generator killed and restarted rejoins weight sync, and
everything it had sent is in the buffer exactly once."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest

from asyncrl.config import load_config, save_config
from asyncrl.learner.runlog import read_batch_log
from asyncrl.transport import make_keys
from tests.conftest import ROOT, asyncrl, free_base_port

pytestmark = pytest.mark.e2e

STEPS = 12


def _config(model_cache, tmp_path, *extra):
    cfg = load_config(ROOT / "configs" / "default.yaml", [
        f"warm_start.cache_dir={model_cache}", f"run_dir={tmp_path}",
        f"net.base_port={free_base_port()}", f"learner.total_steps={STEPS}",
        "learner.checkpoint_interval=4", "learner.eval_interval=100", "net.ready_timeout_s=120",
        *extra])
    path = tmp_path / "run.yaml"
    save_config(cfg, path)
    make_keys(tmp_path / "keys")  # roles started on their own read RUN_DIR/keys
    return path


def _rows(run_dir):
    p = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.is_file() else []


def _wait_for_step(run_dir, step, procs, timeout=300):
    deadline = time.monotonic() + timeout
    while not any(r["step"] >= step for r in _rows(run_dir)):
        assert time.monotonic() < deadline, f"no step {step} within {timeout}s"
        for p in procs:
            assert p.poll() is None, f"{p.args} exited with {p.returncode}"
        time.sleep(0.2)


def _probe(run_dir):
    return [json.loads(x) for x in (run_dir / "sync_probe.jsonl").read_text().splitlines()]


def _stop(procs):
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the role and anything it started
        except ProcessLookupError:
            pass
        p.wait()


# fsdp on one rank still writes sharded checkpoints, so the replay below checks that resuming
# from one gives the uninterrupted run's SHA-256; on two ranks the ranks really are sharded
# (tests/unit/test_shard.py checks that SHA-256 for a 2-rank sharded resume).
@pytest.mark.parametrize("nproc,killed_rank,strategy", [(1, 0, "ddp"), (2, 1, "ddp"),
                                                        (1, 0, "fsdp"), (2, 1, "fsdp")])
def test_learner_killed_under_torchrun_resumes_with_the_same_batches(model_cache, tmp_path,
                                                                     nproc, killed_rank,
                                                                     strategy):
    # One restart: the restarted ranks must meet at once (see the test after this one).
    path = _config(model_cache, tmp_path, "learner.max_restarts=1", f"learner.nproc={nproc}",
                   f"learner.strategy={strategy}")
    run = subprocess.Popen([sys.executable, "-m", "asyncrl", "run", str(path)], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    try:
        _wait_for_step(tmp_path, 6, [run])  # past the checkpoint at step 4
        family = psutil.Process(run.pid).children(recursive=True)
        worker = next(p for p in family if "asyncrl.learner" in " ".join(p.cmdline())
                      and "torch.distributed.run" not in " ".join(p.cmdline())
                      and p.environ().get("RANK") == str(killed_rank))
        killed_at = max(r["step"] for r in _rows(tmp_path))
        worker.send_signal(signal.SIGKILL)
        out, _ = run.communicate(timeout=400)
    finally:
        _stop([run])
    assert run.returncode == 0, out[-3000:]
    assert "the learner restarted and resumed from its checkpoint at step" in out
    log = (tmp_path / "logs" / "learner.log").read_text()
    assert "resumed from" in log, log[-3000:]

    # Every step once in metrics.jsonl; the resumed segment starts after a checkpoint.
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(STEPS + 1))
    resumed = [r["resumed_from_step"] for r in rows if "resumed_from_step" in r]
    assert len(resumed) == 1 and resumed[0] in (4, 8) and resumed[0] <= killed_at + 1
    # Every rank logged each step's batch once.
    for rank in range(nproc):
        logged = list(read_batch_log(tmp_path / "batches" / f"rank{rank}.bin"))
        assert len(logged) == STEPS
    admitted = [json.loads(x) for x in (tmp_path / "admission.jsonl").read_text().splitlines()]
    assert sorted((a["step"], a["rank"]) for a in admitted) == [
        (s, r) for s in range(1, STEPS + 1) for r in range(nproc)]

    # The generator was not restarted: it joined the new learner's session and its policy
    # version only went forward, up to the last step.
    sessions = [line for line in log.splitlines() if "weight-sync session" in line]
    assert len({line.split("weight-sync session ")[1].split()[0] for line in sessions}) == 2
    versions = [p["policy_version"] for p in _probe(tmp_path)]
    assert len({p["incarnation"] for p in _probe(tmp_path)}) == 1
    assert versions == sorted(versions) and versions[-1] == STEPS, versions

    if nproc == 1:
        # The same batches: the uninterrupted replay of the batch log gives the same loss at
        # every step and the same final weights as the killed-and-resumed run.
        r = asyncrl("replay", str(tmp_path), timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"{STEPS} steps ({STEPS} in metrics.jsonl), largest loss difference 0;" in r.stdout


_RESTARTED_RANKS = """
import os, sys, time
import torch, torch.distributed as dist
from asyncrl.learner.main import init_ranks
attempt, rank = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), int(os.environ["RANK"])
if attempt == 1 and rank == 0:
    time.sleep(3)  # rank 1 looks up rank 0's address first, while the dead one's is in the store
init_ranks("gloo")
total = torch.ones(1)
dist.all_reduce(total)
print(f"attempt {attempt} rank {rank} sum {total.item():.0f}", flush=True)
if attempt == 0 and rank == 1:
    os._exit(1)
dist.barrier()
# As the learner ends (asyncrl/learner/main.py): without it, a rank's gloo threads were still
# running at interpreter exit once under load, and it aborted ("terminate called without an
# active exception") after the attempt had succeeded.
dist.destroy_process_group()
"""


def test_restarted_ranks_do_not_read_the_dead_attempts_addresses(tmp_path):
    # torchrun's agent store outlives a restart; without a key prefix per attempt, rank 1 of
    # attempt 1 connects to the address rank 0 of attempt 0 published ("connection refused").
    script = tmp_path / "ranks.py"
    script.write_text(_RESTARTED_RANKS)
    run = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc-per-node", "2", "--max-restarts", "1", str(script)],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        out, err = run.communicate(timeout=120)  # without the fix it can hang: fail, not wait
    finally:
        _stop([run])  # the ranks too, should torchrun hang
    assert run.returncode == 0, out[-2000:] + err[-3000:]
    # Both ranks write to one pipe, so their lines may interleave.
    done = set(re.findall(r"attempt 1 rank (\d) sum 2", out))
    assert done == {"0", "1"}, out


def _buffer_counters(port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    want = {"asyncrl_buffer_trajectories_received_total", "asyncrl_buffer_trajectories_served_total",
            "asyncrl_buffer_occupancy_trajectories",
            "asyncrl_buffer_stale_dropped_trajectories_total"}
    return {k: float(v) for k, v in (line.split() for line in text.splitlines()
                                     if line.split(" ")[0] in want)}


EPISODES = ("env.name=calculator", "generator.max_tokens=6", "generator.max_turns=3",
            "generator.max_episode_tokens=64")


@pytest.mark.parametrize("extra", [(), EPISODES], ids=["samples", "episodes"])
def test_generator_killed_and_restarted_rejoins_and_loses_nothing(model_cache, tmp_path, extra):
    path = _config(model_cache, tmp_path, *extra)
    cfg = load_config(path)
    procs = {}

    def start(role, *extra):
        log = (tmp_path / f"{role}.log").open("a")
        procs[role] = subprocess.Popen(
            [sys.executable, "-m", "asyncrl", role, "--config", str(path), *extra], cwd=ROOT,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    try:
        start("buffer")
        start("generator", "--index", "0")
        start("learner")
        _wait_for_step(tmp_path, 3, procs.values())
        os.killpg(procs["generator"].pid, signal.SIGKILL)
        procs["generator"].wait()
        restarted_at = time.time()
        start("generator", "--index", "0")
        assert procs["learner"].wait(timeout=400) == 0, \
            (tmp_path / "learner.log").read_text()[-3000:]
        # Told that training is over, the standalone generator exits by itself.
        assert procs["generator"].wait(timeout=30) == 0
        counts = _buffer_counters(cfg.net.buffer_metrics_port)
    finally:
        _stop(procs.values())

    # The restarted generator (a new incarnation) joined a new session and loaded weights.
    probe = _probe(tmp_path)
    incarnations = list(dict.fromkeys(p["incarnation"] for p in probe))
    assert len(incarnations) == 2
    second = [p["policy_version"] for p in probe if p["incarnation"] == incarnations[1]]
    assert second[0] == 0 and max(second) == STEPS and second == sorted(second), second
    assert "gen0 restarted" in (tmp_path / "learner.log").read_text()

    # Nothing twice, nothing lost: no group reached the learner twice, groups of both
    # incarnations were trained on, and every trajectory the buffer accepted was served, is
    # still held, or was dropped as stale (counted).
    groups = [g for step in read_batch_log(tmp_path / "batches" / "rank0.bin") for g in step]
    keys = [(g.created_at, g.prompt_id, g.completions[0].tokens.tobytes()) for g in groups]
    assert len(set(keys)) == len(keys) == STEPS * cfg.learner.groups_per_step
    assert any(g.created_at > restarted_at for g in groups)
    assert any(g.created_at < restarted_at for g in groups)
    if extra:  # multi-turn episodes: observations travelled as injected tokens
        assert all(c.sources is not None and c.sources.any() for g in groups
                   for c in g.completions if len(c.tokens) > 8)
    assert counts["asyncrl_buffer_trajectories_received_total"] == (
        counts["asyncrl_buffer_trajectories_served_total"]
        + counts["asyncrl_buffer_occupancy_trajectories"]
        + counts["asyncrl_buffer_stale_dropped_trajectories_total"]), counts
