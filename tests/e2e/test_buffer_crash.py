"""Kill -9 the real buffer process and restart it: nothing it acknowledged is lost or doubled."""

import json
import signal
import subprocess
import sys
import time

import pytest

from asyncrl import transport, wire
from asyncrl.config import load_config, save_config
from tests.conftest import ROOT, free_base_port
from tests.helpers.wire import traj_frame

pytestmark = pytest.mark.e2e


def _start(path):
    return subprocess.Popen([sys.executable, "-m", "asyncrl", "buffer", "--config", str(path)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _ack(client, frame):
    reply = client.request(frame, timeout_s=30)
    assert reply is not None, "buffer did not answer"
    return wire.decode(reply)


def _take(client, n):
    reply = client.request(wire.encode("batch_request", 0, rank=0, num_groups=n), timeout_s=30)
    return wire.decode(reply)


def test_buffer_killed_and_restarted_loses_nothing_it_acked(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": 300}))
    cfg = load_config(None, [f"model.path={model}", f"run_dir={tmp_path / 'run'}",
                             f"net.base_port={free_base_port()}", "buffer.admit_steps=10"])
    path = tmp_path / "buffer.yaml"
    save_config(cfg, path)
    keys = transport.load_keys(transport.make_keys(tmp_path / "run" / "keys"), "gen0")
    ctx = transport.context()
    gen = transport.Client(ctx, "127.0.0.1", cfg.net.buffer_ingest_port, "gen0", keys)
    learner = transport.Client(ctx, "127.0.0.1", cfg.net.buffer_learner_port, "learner0",
                               transport.load_keys(tmp_path / "run" / "keys", "learner"))
    proc = _start(path)
    try:
        for seq in range(1, 11):
            assert _ack(gen, traj_frame(seq, pid=seq)).status == "ok"
        assert [g.prompt_id for g in _take(learner, 3).groups] == [1, 2, 3]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        t0 = time.monotonic()
        proc = _start(path)
        # the generator did not get this ack (say): it resends, and it is not stored twice
        assert _ack(gen, traj_frame(10, pid=10)).reason == "duplicate"
        recovery_s = time.monotonic() - t0
        assert [g.prompt_id for g in _take(learner, 7).groups] == list(range(4, 11))
        assert _take(learner, 1).status == "not_ready"
        print(f"buffer back and answering {recovery_s:.1f}s after the restart")
    finally:
        proc.kill()
        proc.wait()
        gen.close()
        learner.close()
