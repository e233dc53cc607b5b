"""With the learner frozen (SIGSTOP), the buffer stays within its admission limit and the
generator waits (busy replies) instead of dropping anything."""

import re
import signal
import time
import urllib.request

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from asyncrl.config import load_config
from tests.conftest import wait_until
from tests.helpers.runs import metrics_rows, run_overrides, start_run

pytestmark = pytest.mark.e2e


def _metrics(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return {s.name: s.value for f in text_string_to_metric_families(r.read().decode())
                for s in f.samples}


def test_stalled_learner_makes_generators_wait_not_drop(model_cache, tmp_path):
    from tests.conftest import free_base_port

    base = free_base_port()
    proc = start_run(run_overrides(model_cache, tmp_path, base, **{
        "learner.total_steps": 1000, "learner.nproc": 1, "buffer.max_staleness": 1000,
        "buffer.admit_steps": 2}))
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "metrics.jsonl").exists() or len(metrics_rows(tmp_path)) < 3:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.5)
        learners = [p for p in psutil.Process(proc.pid).children(recursive=True)
                    if "asyncrl.learner" in " ".join(p.cmdline())]
        for p in learners:
            p.send_signal(signal.SIGSTOP)
        before = _metrics(base + 20)["asyncrl_generator_busy_retries_total"]
        cfg = load_config(tmp_path / "config.yaml")
        # admit_steps x groups_per_step, passed by less than one message (asyncrl/buffer/store.py):
        # a streaming generator's message holds at most max_inflight / group_size groups.
        admit = 2 * 4 + cfg.generator.max_inflight // cfg.generator.group_size - 1
        # The learner stays frozen for 15 s on purpose; the occupancy is sampled throughout.
        frozen_until, occupancy = time.monotonic() + 15, []
        while time.monotonic() < frozen_until:
            occupancy.append(_metrics(base + 10)["asyncrl_buffer_occupancy_groups"])
            time.sleep(0.5)
        assert max(occupancy) <= admit, occupancy
        # The generator waits: busy replies, however long the full buffer took to fill up.
        wait_until(lambda: _metrics(base + 20)["asyncrl_generator_busy_retries_total"] > before,
                   120, "the generator getting busy replies from the full buffer")
        assert _metrics(base + 10)["asyncrl_buffer_occupancy_groups"] <= admit

        def sent_and_received():
            buf, gen = _metrics(base + 10), _metrics(base + 20)
            return (gen["asyncrl_generator_trajectories_sent_total"],
                    buf["asyncrl_buffer_trajectories_received_total"],
                    buf["asyncrl_buffer_stale_dropped_trajectories_total"])

        # Nothing the generator counts as sent is missing (the two scrapes are not atomic, so
        # a send completing between them is allowed to settle), and nothing was dropped.
        sent, received, stale = wait_until(lambda: (c := sent_and_received())[0] == c[1] and c,
                                           30, "the buffer to have received what was sent")
        assert stale == 0
        for p in learners:
            p.send_signal(signal.SIGCONT)
        steps = len(metrics_rows(tmp_path))
        wait_until(lambda: len(metrics_rows(tmp_path)) > steps, 180,  # and training goes on
                   f"a training step after step {steps} once the learner resumed")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)


def test_frozen_generator_is_detected_by_heartbeats(model_cache, tmp_path):
    from tests.conftest import free_base_port

    base = free_base_port()
    proc = start_run(run_overrides(model_cache, tmp_path, base, **{
        "learner.total_steps": 1000, "learner.nproc": 1, "net.heartbeat_timeout_s": 3}))
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "metrics.jsonl").exists() or len(metrics_rows(tmp_path)) < 2:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.5)
        assert _metrics(base + 10)["asyncrl_buffer_peers_silent"] == 0
        gen = next(p for p in psutil.Process(proc.pid).children(recursive=True)
                   if " asyncrl generator " in " ".join(p.cmdline()))
        gen.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        wait_until(lambda: _metrics(base + 10)["asyncrl_buffer_peers_silent"] >= 1, 60,
                   "the buffer reporting the frozen generator as silent")
        print(f"frozen generator detected after {time.monotonic() - t0:.1f}s")
        # The bound (docs/reliability.md) is on the buffer's own clock: timeout (3 s) + heartbeat
        # interval (1 s) + the buffer's poll (0.5 s) after the last heartbeat. The age it logs is
        # measured there, free of this test's polling and scraping on a loaded machine.
        log = tmp_path / "logs" / "buffer.log"
        line = wait_until(lambda: re.search(r"peer gen0 silent for ([\d.]+)s", log.read_text()),
                          30, "the buffer's log line naming the silent generator")
        age_s = float(line[1])
        print(f"the buffer reported it {age_s:.1f}s after its last heartbeat")
        assert 3 <= age_s <= 3 + 1 + 0.5, age_s
        gen.send_signal(signal.SIGCONT)
        wait_until(lambda: _metrics(base + 10)["asyncrl_buffer_peers_silent"] == 0, 60,
                   "the buffer reporting the resumed generator alive again")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
