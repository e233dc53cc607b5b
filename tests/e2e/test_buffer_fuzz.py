"""Fuzz the real buffer process's ports for a bounded time over real sockets: it never dies,
every reject is counted by reason, and a valid message still gets through afterwards."""

import json
import random
import subprocess
import sys
import time
import urllib.request

import msgpack
import pytest
from prometheus_client.parser import text_string_to_metric_families

from asyncrl import transport, wire
from asyncrl.config import load_config, save_config
from tests.conftest import ROOT, free_base_port
from tests.helpers.wire import traj_frame

pytestmark = pytest.mark.e2e
FUZZ_SECONDS = 10


def _frames(rng: random.Random):
    good = traj_frame(1, pid=1)
    payload = good[8:]
    kinds = {
        "random": lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))),
        "truncated": lambda: good[: rng.randrange(len(good))],
        "oversized": lambda: wire.MAGIC + b"\0" * 4 + b"\xc4" * (wire.MAX_FRAME_BYTES + 16),
        "mutated": lambda: bytes(b ^ (rng.randrange(1, 256) if rng.random() < 0.02 else 0)
                                 for b in good),
        "mutated_resealed": lambda: wire.seal(bytes(
            b ^ (rng.randrange(1, 256) if rng.random() < 0.02 else 0) for b in payload)),
        "wrong_version": lambda: wire.seal(msgpack.packb(
            {**msgpack.unpackb(payload, raw=False, ext_hook=msgpack.ExtType), "schema": 99},
            use_bin_type=True)),
    }
    return kinds


def test_fuzzed_buffer_survives_and_counts_every_reject(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": 300}))
    cfg = load_config(None, [f"model.path={model}", f"run_dir={tmp_path / 'run'}",
                             f"net.base_port={free_base_port()}"])
    save_config(cfg, tmp_path / "b.yaml")
    keys = transport.load_keys(transport.make_keys(tmp_path / "run" / "keys"))
    proc = subprocess.Popen([sys.executable, "-m", "asyncrl", "buffer", "--config",
                             str(tmp_path / "b.yaml")], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ctx = transport.context()
    rng = random.Random(0)
    sent = replies = 0
    try:
        client = transport.Client(ctx, "127.0.0.1", cfg.net.buffer_ingest_port, "fuzz", keys)
        assert client.request(traj_frame(1, pid=1), timeout_s=60) is not None  # up
        kinds = _frames(rng)
        oversized = kinds.pop("oversized")()  # built once: 256 MiB
        deadline = time.monotonic() + FUZZ_SECONDS
        while time.monotonic() < deadline:
            frame = oversized if rng.random() < 0.002 else kinds[rng.choice(list(kinds))]()
            sent += 1
            if client.request(frame, timeout_s=10) is not None:
                replies += 1
        assert proc.poll() is None, "the buffer died"
        ok = wire.decode(client.request(traj_frame(2, pid=2), timeout_s=10))
        assert ok.status == "ok"
        with urllib.request.urlopen(
                f"http://127.0.0.1:{cfg.net.buffer_metrics_port}/metrics") as r:
            fams = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
        by_reason = {s.labels["reason"]: s.value
                     for s in fams["asyncrl_buffer_messages_rejected"].samples
                     if s.name.endswith("_total")}
        print(f"{sent} fuzz frames, {replies} replies, rejects by reason: {by_reason}")
        assert replies == sent  # every frame answered, none left hanging
        assert {"bad_checksum", "bad_magic", "schema_version"} <= set(by_reason)
        accepted = fams["asyncrl_buffer_trajectories_received"].samples[0].value / 2
        dups = fams["asyncrl_buffer_duplicate_messages"].samples[0].value
        # every frame accounted for: rejected by reason, accepted, or acked as a duplicate
        # (plus the two valid messages sent before and after the fuzzing)
        assert sum(by_reason.values()) + accepted + dups == sent + 2
    finally:
        proc.kill()
        proc.wait()
