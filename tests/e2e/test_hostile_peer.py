"""A peer holding a valid key, gone hostile (a compromised generator host), inside a real run:
60 s of hostile but correctly sealed frames at every port its key reaches cost counters, not
disk (the role logs grow by less than 1 MB; they grew 19 MB before refusals were logged at a
bounded rate); its key takes no batches; and the values that pass the codec but would stall the
run (a hello at a version far ahead of the learner, a batch request near 2**40, a flood of new
incarnations) are refused and counted. The run keeps training throughout. Real vLLM, sockets,
torchrun."""

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
import warnings

import pytest

from asyncrl import transport, wire
from asyncrl.guard import NewStreams
from tests.conftest import ROOT, free_base_port, wait_until
from tests.helpers.fuzz import hostile_frames
from tests.helpers.wire import traj_frame

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FLOOD_S = 60.0


def _pool(kind: str, n: int) -> list[bytes]:
    """n hostile sealed frames of `kind` (hypothesis draws, made once up front)."""
    from hypothesis.errors import NonInteractiveExampleWarning

    strategy = hostile_frames(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonInteractiveExampleWarning)
        return [strategy.example() for _ in range(n)]


def _metric(metrics_port: int, name: str, **labels) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                  timeout=10).read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    total = 0.0
    for m in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M):
        if all(part in m.group(1).split(",") for part in want.split(",") if part):
            total += float(m.group(2))
    return total


def _rows(run_dir):
    p = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x] if p.is_file() else []


def test_a_hostile_key_holder_costs_counters_not_disk_and_cannot_stall_the_run(model_cache,
                                                                               tmp_path):
    base = free_base_port()
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncrl", "run", "configs/default.yaml",
         f"warm_start.cache_dir={model_cache}", f"run_dir={run_dir}", f"net.base_port={base}",
         "learner.total_steps=100000", "learner.eval_interval=100000",
         "learner.checkpoint_interval=100000", "net.ready_timeout_s=120"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    pools = {k: _pool(k, 150) for k in ("trajectories", "generator_hello", "heartbeat")}
    try:
        wait_until(lambda: len(_rows(run_dir)) >= 3 or proc.poll() is not None, 300,
                   "the run's first steps")
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        keys = transport.load_keys(run_dir / "keys", "gen0")  # the compromised host's
        ctx = transport.context()  # kept for the session (tests/conftest.py)
        ingest = transport.Client(ctx, "127.0.0.1", base + 0, "gen0", keys)
        control = transport.Client(ctx, "127.0.0.1", base + 2, "gen0", keys)
        beats = transport.Client(ctx, "127.0.0.1", base + 4, "gen0", keys)

        # Its key takes no batches: refused at the handshake, as a wrong role.
        thief = transport.Client(ctx, "127.0.0.1", base + 1, "learner0", keys)
        assert thief.request(wire.encode("batch_request", 0, rank=0, num_groups=1),
                             timeout_s=2.0) is None
        wait_until(lambda: _metric(base + 10, "asyncrl_buffer_auth_failures_total",
                                   port=base + 1, reason="wrong_role") >= 1, 30,
                   "the buffer counting the generator key's refusal on its learner port")

        # The three stalling values: a hello far ahead of the learner, 40 new incarnations
        # (hellos, and trajectories streams at the buffer), a batch request near 2**40 (from
        # the learner's key: a generator's cannot even ask).
        control.send(wire.encode("generator_hello", 2**40 - 5, sender="gen0", sync_rank=1,
                                 incarnation="evil", session=""))
        for k in range(40):
            control.send(wire.encode("generator_hello", 0, sender="gen0", sync_rank=1,
                                     incarnation=f"evil{k}", session=""))
            ingest.request(wire.encode("trajectories", 0, sender="gen0",
                                       incarnation=f"evil{k}", seq=1,
                                       groups=wire.decode(traj_frame(1, pid=1)).groups),
                           timeout_s=5)
        learner = transport.Client(ctx, "127.0.0.1", base + 1, "learner9",
                                   transport.load_keys(run_dir / "keys", "learner"))
        reply = wire.decode(learner.request(wire.encode("batch_request", 2**40 - 2, rank=0,
                                                        num_groups=1), timeout_s=10))
        assert reply.kind == "error" and "version_ahead" in reply.reason

        logs = {p.name: p.stat().st_size for p in (run_dir / "logs").glob("*.log")}
        step_before = max(r["step"] for r in _rows(run_dir))
        t0, sent, i = time.monotonic(), 0, 0
        while time.monotonic() - t0 < FLOOD_S:
            i += 1
            ingest.request(pools["trajectories"][i % 150], timeout_s=2)
            control.send(pools["generator_hello"][i % 150])
            beats.send(pools["heartbeat"][i % 150])
            sent += 3
        grown = {name: p.stat().st_size - logs.get(name, 0)
                 for p in (run_dir / "logs").glob("*.log") for name in [p.name]}
        step_after = max(r["step"] for r in _rows(run_dir))
        print(f"\n{sent} hostile frames in {FLOOD_S:.0f}s; logs grew {grown} bytes; "
              f"steps {step_before} -> {step_after}")
        assert sum(grown.values()) < 1_000_000, grown
        assert step_after > step_before, "the run stopped training under the flood"

        learner_rejects = {r: _metric(base + 60, "asyncrl_learner_messages_rejected_total",
                                      reason=r)
                           for r in ("version_ahead", "incarnation_conflict")}
        buffer_rejects = {r: _metric(base + 10, "asyncrl_buffer_messages_rejected_total",
                                     reason=r)
                          for r in ("version_ahead", "too_many_incarnations")}
        # The buffer remembers at most NewStreams().limit streams of gen0 (its own included):
        # the others were refused, or answered busy while the buffer was full (those open none).
        streams = {json.loads(x)["incarnation"] for x in (run_dir / "buffer" / "accepted.jsonl")
                   .read_text().splitlines() if json.loads(x)["sender"] == "gen0"}
        print(f"learner rejects {learner_rejects}, buffer rejects {buffer_rejects}, gen0 "
              f"streams accepted {len(streams)}")
        assert learner_rejects["version_ahead"] >= 1
        assert learner_rejects["incarnation_conflict"] >= 40 - 2  # gen0 speaks meanwhile
        assert buffer_rejects["version_ahead"] >= 1
        assert len(streams) <= NewStreams().limit
        assert proc.poll() is None
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out[-3000:]
