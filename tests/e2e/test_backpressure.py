"""With the learner frozen (SIGSTOP), the buffer stays within its admission limit and the
generator waits (busy replies) instead of dropping anything."""

import signal
import time
import urllib.request

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.test_loop import _overrides, _rows, _start

pytestmark = pytest.mark.e2e


def _metrics(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return {s.name: s.value for f in text_string_to_metric_families(r.read().decode())
                for s in f.samples}


def test_stalled_learner_makes_generators_wait_not_drop(model_cache, tmp_path):
    from tests.conftest import free_base_port

    base = free_base_port()
    proc = _start(_overrides(model_cache, tmp_path, base, **{
        "learner.total_steps": 1000, "learner.nproc": 1, "buffer.max_staleness": 1000,
        "buffer.admit_steps": 2}))
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "metrics.jsonl").exists() or len(_rows(tmp_path)) < 3:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.5)
        learners = [p for p in psutil.Process(proc.pid).children(recursive=True)
                    if "asyncrl.learner" in " ".join(p.cmdline())]
        for p in learners:
            p.send_signal(signal.SIGSTOP)
        before = _metrics(base + 20)["asyncrl_generator_busy_retries_total"]
        time.sleep(15)
        buf, gen = _metrics(base + 10), _metrics(base + 20)
        admit = 2 * 4  # admit_steps x groups_per_step
        assert buf["asyncrl_buffer_occupancy_groups"] <= admit
        assert gen["asyncrl_generator_busy_retries_total"] > before  # it is waiting
        assert buf["asyncrl_buffer_stale_dropped_trajectories_total"] == 0
        sent, received = (gen["asyncrl_generator_trajectories_sent_total"],
                          buf["asyncrl_buffer_trajectories_received_total"])
        assert sent == received  # nothing the generator counts as sent is missing
        for p in learners:
            p.send_signal(signal.SIGCONT)
        steps = len(_rows(tmp_path))
        time.sleep(10)
        assert len(_rows(tmp_path)) > steps  # and training goes on
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)


def test_frozen_generator_is_detected_by_heartbeats(model_cache, tmp_path):
    from tests.conftest import free_base_port

    base = free_base_port()
    proc = _start(_overrides(model_cache, tmp_path, base, **{
        "learner.total_steps": 1000, "learner.nproc": 1, "net.heartbeat_timeout_s": 3}))
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "metrics.jsonl").exists() or len(_rows(tmp_path)) < 2:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.5)
        assert _metrics(base + 10)["asyncrl_buffer_peers_silent"] == 0
        gen = next(p for p in psutil.Process(proc.pid).children(recursive=True)
                   if " asyncrl generator " in " ".join(p.cmdline()))
        gen.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        while _metrics(base + 10)["asyncrl_buffer_peers_silent"] < 1:
            assert time.monotonic() - t0 < 15, "frozen generator not detected"
            time.sleep(0.2)
        detected_s = time.monotonic() - t0
        print(f"frozen generator detected after {detected_s:.1f}s")
        # bound: timeout (3 s) + heartbeat interval (1 s) + the buffer's poll (0.5 s)
        assert detected_s < 3 + 1 + 0.5 + 0.5
        assert "peer gen0 silent" in (tmp_path / "logs" / "buffer.log").read_text()
        gen.send_signal(signal.SIGCONT)
        t0 = time.monotonic()
        while _metrics(base + 10)["asyncrl_buffer_peers_silent"] > 0:
            assert time.monotonic() - t0 < 10
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
