"""configs/agent-endpoint.yaml inside `asyncrl run`, with a role dying: the generator that
serves the endpoint (and whose agent process runs task.agent) is SIGKILLed mid-run. Its agent
process exits by itself (it is not in the launcher's kill), the launcher restarts the
generator, which starts a new agent process, and the run finishes with every acknowledged
group trained exactly once (the audit)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_base_port
from tests.helpers.runs import Output, assert_every_step_and_group_once, kill_session, pids

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _agent_processes(parent: int) -> list[int]:
    """The agent processes (multiprocessing's spawned children) of a generator pid."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmdline = (d / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"spawn_main" in cmdline:
            out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_killed_endpoint_generator_takes_its_agents_along_and_loses_no_group(model_cache,
                                                                            tmp_path):
    steps = 16
    args = [f"warm_start.cache_dir={model_cache}", f"run_dir={tmp_path}",
            f"net.base_port={free_base_port()}", f"learner.total_steps={steps}",
            "learner.eval_interval=100", "learner.checkpoint_interval=100",
            "net.ready_timeout_s=120", "run.restart_delay_s=2"]
    proc = subprocess.Popen([sys.executable, "-m", "asyncrl", "run",
                             "configs/agent-endpoint.yaml", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    out = Output(proc)
    try:
        roles = pids(out.until(r"\[run\] started .*", timeout_s=1200).group(0))
        out.until(r"\[step 5/")
        agents = _agent_processes(roles["gen0"])
        assert len(agents) == 1, agents
        os.kill(roles["gen0"], signal.SIGKILL)  # the generator alone: its agents must follow
        deadline = time.monotonic() + 30
        while _alive(agents[0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(agents[0]), "the agent process outlived its generator"
        out.until(r"gen0 exited with code -9; restarting it")
        out.until(r"gen0 restarted")
        text = out.rest(timeout_s=900)
    finally:
        kill_session(proc)
    assert proc.returncode == 0, text[-4000:]
    assert_every_step_and_group_once(tmp_path, steps)
