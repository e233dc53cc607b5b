"""CurveZMQ with real processes and sockets: a peer without the run's keys can neither deliver
trajectories, take batches, send heartbeats nor join weight sync; every refusal is counted and
logged once; holders of the keys are served throughout."""

import json
import subprocess
import sys
import time
import urllib.request

import pytest

from asyncrl import transport, wire
from asyncrl.config import load_config, save_config
from tests.conftest import ROOT, free_base_port
from tests.helpers.wire import traj_frame

pytestmark = pytest.mark.e2e


def _metrics(port) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def _value(text, name, **labels) -> float:
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(want + " "))


def test_buffer_serves_only_holders_of_the_run_keys(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": 300}))
    run = tmp_path / "run"
    cfg = load_config(None, [f"model.path={model}", f"run_dir={run}",
                             f"net.base_port={free_base_port()}", "net.heartbeat_timeout_s=2"])
    save_config(cfg, tmp_path / "b.yaml")
    keys = transport.load_keys(transport.make_keys(run / "keys"), "gen0")
    learner_keys = transport.load_keys(run / "keys", "learner")
    other = transport.load_keys(transport.make_keys(tmp_path / "other-run"))
    forged = transport.Keys(keys.server_public, other.server_secret, other.client_public,
                            other.client_secret)  # knows the public server key, not the client's
    log = (tmp_path / "buffer.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "asyncrl", "buffer", "--config",
                             str(tmp_path / "b.yaml")], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
    ctx = transport.context()
    net = cfg.net
    try:
        gen = transport.Client(ctx, "127.0.0.1", net.buffer_ingest_port, "gen0", keys)
        assert wire.decode(gen.request(traj_frame(1, pid=1), timeout_s=60)).status == "ok"
        intruders = {
            "no key": None, "unknown client key": forged, "another run's keys": other}
        for what, k in intruders.items():
            ingest = transport.Client(ctx, "127.0.0.1", net.buffer_ingest_port, "evil", k)
            assert ingest.request(traj_frame(7, pid=7), timeout_s=1.0) is None, what
            taker = transport.Client(ctx, "127.0.0.1", net.buffer_learner_port, "evil", k)
            req = wire.encode("batch_request", 0, rank=0, num_groups=1)
            assert taker.request(req, timeout_s=1.0) is None, what
            transport.Heartbeat("127.0.0.1", net.heartbeat_port, lambda: wire.encode(
                "heartbeat", 0, sender="evil", role="generator"), 0.1, k).start()
        # A generator's own key on the learner's port: it takes no batch (wrong_role).
        thief = transport.Client(ctx, "127.0.0.1", net.buffer_learner_port, "learner0", keys)
        req = wire.encode("batch_request", 0, rank=0, num_groups=1)
        assert thief.request(req, timeout_s=1.0) is None
        deadline = time.monotonic() + 30
        while True:
            text = _metrics(net.buffer_metrics_port)
            # No CURVE or another run's keys: "protocol" or "handshake" (libzmq's timing);
            # an unknown client key: "unknown_key".
            by = {(p, kind): sum(_value(text, "asyncrl_buffer_auth_failures_total", port=p,
                                        reason=r) for r in reasons)
                  for p in (net.buffer_ingest_port, net.buffer_learner_port, net.heartbeat_port)
                  for kind, reasons in (("no curve", ("protocol", "handshake")),
                                        ("unknown key", ("unknown_key",)))}
            by["wrong role"] = _value(text, "asyncrl_buffer_auth_failures_total",
                                      port=net.buffer_learner_port, reason="wrong_role")
            if all(v >= 1 for v in by.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert all(v >= 1 for v in by.values()), by
        # Nothing of theirs got in: one message accepted (ours), no heartbeat from "evil".
        assert _value(text, "asyncrl_buffer_trajectories_received_total") == 2  # traj_frame: 2 each
        assert 'peer="evil"' not in text
        # The run's own peers are still served, and take exactly what they sent.
        learner = transport.Client(ctx, "127.0.0.1", net.buffer_learner_port, "learner0",
                                   learner_keys)
        batch = wire.decode(learner.request(wire.encode("batch_request", 0, rank=0, num_groups=1),
                                            timeout_s=10))
        assert [g.prompt_id for g in batch.groups] == [1]
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
    text = (tmp_path / "buffer.log").read_text()
    # Logged once per peer address (unknown key) or per port and reason, not per attempt.
    refusals = [ln for ln in text.splitlines() if "refused a peer" in ln
                or "failed the CURVE handshake" in ln]
    assert 1 <= len(refusals) <= 6, refusals
    print(f"{sum(by.values()):.0f} connections refused and counted; {len(refusals)} log lines")
