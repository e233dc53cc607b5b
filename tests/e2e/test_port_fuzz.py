"""Structure-aware fuzzing of every port of every role over real sockets: correctly sealed
frames whose maps hypothesis spoils (tests/helpers/fuzz.py has the strategies) go to the
buffer's ingest, learner and heartbeat ports (a real buffer process), to the learner's sync
control port (a real WeightSender on a real Server) and to a generator's control socket (a real
SyncMember with a fake engine, whose DEALER a ROUTER of ours talks to). Each role keeps
answering a valid request between the hostile ones, counts every reject by the reason the codec
gives (checked exactly, against decoding each frame here), and the budget is fixed: PER_PORT
derandomized examples per port.

Run with -s to see the frames fuzzed per port (docs/reliability.md quotes them).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from asyncrl import metrics, transport, wire
from asyncrl.config import load_config, save_config
from asyncrl.guard import NewStreams
from asyncrl.sync.member import LearnerFinished, SyncMember
from asyncrl.sync.sender import WeightSender
from tests.conftest import ROOT, free_base_port, wait_until
from tests.helpers.fuzz import VOCAB, hostile_frames
from tests.helpers.sync import Generator

pytestmark = [pytest.mark.e2e,
              pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")]
HOST = "127.0.0.1"
PER_PORT = 1000  # hostile frames per port; the whole file takes ~20 s on 2 cores
PROBE_EVERY = 25  # a valid request after this many hostile frames
# No shrinking: a failure here replays with the same seed, and the codec test shrinks.
BUDGET = settings(max_examples=PER_PORT, deadline=10_000, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.large_base_example])


def _expected_reject(frame: bytes, role: str | None = None, max_version: int | None = None,
                     **kw) -> str | None:
    """The reason the receiver must count for this frame (None: it is a valid message).
    `role`: the key the frame comes with, whose role its sender must be (learner ranks:
    learner<r>); `max_version`: the newest version a batch_request may ask at."""
    try:
        msg = wire.decode(frame, **kw)
    except wire.MessageError as e:
        return e.reason
    sender = getattr(msg, "sender", None)
    if role is not None and sender is not None and not (
            sender == role or (role == "learner" and re.fullmatch(r"learner\d+", sender))):
        return "sender_mismatch"
    if max_version is not None and msg.kind == "batch_request" and (
            msg.policy_version > max_version):
        return "version_ahead"
    return None


def _trajectories(seq: int, sender: str = "gen0", token: int = 3) -> bytes:
    comps = [wire.Completion(np.array([token, 4], np.int32), np.array([-0.5, -1], np.float32),
                             r, "stop") for r in (0.0, 1.0)]
    group = wire.TrajectoryGroup(seq, np.array([1], np.int32), 0, comps, sender, 0.0)
    return wire.encode("trajectories", 0, sender=sender, incarnation="i", seq=seq,
                       groups=[group])


# ---------------------------------------------------------------- the buffer's three ports


def _scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as r:
        return {f.name: f for f in text_string_to_metric_families(r.read().decode())}


def _rejects(fams: dict) -> Counter:
    fam = fams.get("asyncrl_buffer_messages_rejected")
    return Counter({s.labels["reason"]: int(s.value) for s in (fam.samples if fam else [])
                    if s.name.endswith("_total")})


def _peers(fams: dict) -> set[str]:
    fam = fams.get("asyncrl_buffer_peer_heartbeat_age_seconds")
    return {s.labels["peer"] for s in (fam.samples if fam else [])}


@pytest.fixture
def buffer(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": VOCAB}))
    # With the run's CURVE keys, as in a run: the fuzzing peer is an authenticated but buggy
    # or compromised one (intruders without keys: tests/e2e/test_auth.py).
    cfg = load_config(None, [f"model.path={model}", f"run_dir={tmp_path / 'run'}",
                             f"net.base_port={free_base_port()}", "buffer.durable=true"])
    transport.make_keys(tmp_path / "run" / "keys")
    save_config(cfg, tmp_path / "buffer.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "asyncrl", "buffer", "--config",
                             str(tmp_path / "buffer.yaml")], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield cfg, proc
    finally:
        proc.kill()
        proc.wait()


def test_the_buffer_survives_hostile_sealed_frames_on_all_three_ports(buffer):
    cfg, proc = buffer
    net, t0 = cfg.net, time.monotonic()
    ctx = transport.context()
    # Each port with the key of a role it admits: a generator's on ingest, the learner's on
    # the learner port and (numbered senders learner<k> for the probes) on heartbeats.
    keys, learner_keys = (transport.keys_for(net, cfg.run_dir, r) for r in ("gen0", "learner"))
    ingest = transport.Client(ctx, HOST, net.buffer_ingest_port, "fuzz-ingest", keys)
    learner = transport.Client(ctx, HOST, net.buffer_learner_port, "fuzz-learner",
                               learner_keys)
    beats = transport.Client(ctx, HOST, net.heartbeat_port, "fuzz-beats", learner_keys)
    assert ingest.request(_trajectories(1), timeout_s=60) is not None, "buffer not up"
    probe = {"seq": 1, "beat": 0}
    expected = Counter()

    def valid_requests_answered() -> None:
        """A valid message to each port gets its valid answer (heartbeats: a new peer)."""
        probe["seq"] += 1
        ack = wire.decode(ingest.request(_trajectories(probe["seq"]), timeout_s=10))
        assert ack.seq == probe["seq"] and ack.status in ("ok", "busy"), ack
        batch = wire.decode(learner.request(wire.encode("batch_request", 0, rank=0, num_groups=1),
                                            timeout_s=10))
        assert batch.kind == "batch", batch
        probe["beat"] += 1
        peer = f"learner{1000 + probe['beat']}"
        beats.send(wire.encode("heartbeat", 0, sender=peer, role="learner"))
        wait_until(lambda: peer in _peers(_scrape(net.buffer_metrics_port)), 10,
                   f"the buffer to take heartbeat {peer}", interval_s=0.05)

    def fuzz_port(client, kind: str, decode_kw: dict, replies: bool) -> int:
        sent = 0

        @BUDGET
        @given(frame=hostile_frames(kind))
        def one(frame: bytes) -> None:
            nonlocal sent
            sent += 1
            reason = _expected_reject(frame, **decode_kw)
            if reason is not None:
                expected[reason] += 1
            if replies:
                reply = wire.decode(client.request(frame, timeout_s=10))
                if reason is None:
                    assert reply.kind in ("ack", "batch"), reply
                else:  # rejected, and told why
                    assert reply.kind in ("ack", "error") and reply.reason.startswith(
                        reason + ":"), (reason, reply)
            else:
                client.send(frame)
            if sent % PROBE_EVERY == 0:
                valid_requests_answered()

        one()
        return sent

    before = _rejects(_scrape(net.buffer_metrics_port))
    # One frame per value check the draws may miss: a token outside the vocabulary.
    bad = wire.decode(ingest.request(_trajectories(10**6, token=VOCAB + 5), timeout_s=10))
    assert bad.status == "rejected" and bad.reason.startswith("bad_token:"), bad
    expected["bad_token"] += 1
    sent = {"buffer ingest (+0)": fuzz_port(ingest, "trajectories",
                                            {"expect": ("trajectories",), "vocab_size": VOCAB,
                                             "role": "gen0"}, replies=True),
            "buffer learner (+1)": fuzz_port(learner, "batch_request",
                                             {"expect": ("batch_request",), "role": "learner",
                                              "max_version": cfg.learner.total_steps},
                                             replies=True),
            "heartbeat (+4)": fuzz_port(beats, "heartbeat", {"expect": ("heartbeat",),
                                                              "role": "learner"},
                                        replies=False)}
    valid_requests_answered()  # heartbeats are taken in order: every fuzzed one is counted now
    assert proc.poll() is None, "the buffer died"
    counted = _rejects(_scrape(net.buffer_metrics_port))
    counted.subtract(before)
    ctx.destroy(linger=0)
    assert +counted == +expected  # every reject counted, by the reason the codec gives
    # The frames got past the framing to the field and column checks, not only to the first.
    assert {"bad_type", "missing_field", "invalid", "inconsistent", "bad_token"} <= set(expected)
    print(f"\nframes fuzzed per port: {sent}; rejects by reason {dict(expected)}; "
          f"{time.monotonic() - t0:.1f} s")


# ---------------------------------------------------------------- learner rank 0's sync port


def test_the_sync_control_port_survives_hostile_sealed_frames_and_still_forms_a_session(
        tmp_path):
    base, t0 = free_base_port(), time.monotonic()
    registry = CollectorRegistry()
    m = metrics.LearnerMetrics(registry)
    ctx = transport.context()
    keys = transport.load_keys(transport.make_keys(tmp_path / "keys"))
    sender = WeightSender(transport.Server(ctx, HOST, base + 2, keys), HOST, base + 3, 1,
                          "gloo", timeout_s=30.0, ready_timeout_s=30.0,
                          rejected=m.messages_rejected)
    fuzz = transport.Client(ctx, HOST, base + 2, "fuzz", keys)  # gen0's key
    sender.version_bound = 10**6  # a learner at step 10**6: hellos beyond it are refused
    # Every probe below is a new incarnation: the bound on those is tests/unit/test_guard.py's.
    sender.streams = NewStreams(limit=10**6)
    sender.live_s = 0.0  # and so is the refusal of an incarnation while the old one speaks
    expected, sent = Counter(), 0

    def hello_is_heard(k: int) -> None:
        fuzz.send(wire.encode("generator_hello", k, sender="gen0", sync_rank=1,
                              incarnation=f"probe{k}", session=""))
        sender._drain(timeout_s=10.0)
        assert sender.members["gen0"].incarnation == f"probe{k}"

    @BUDGET
    @given(frame=st.one_of(hostile_frames("generator_hello"), hostile_frames("weights_loaded")))
    def one(frame: bytes) -> None:
        nonlocal sent
        sent += 1
        reason = _expected_reject(frame, expect=("generator_hello", "weights_loaded",
                                                 "eval_result"))
        if reason is None:
            msg = wire.decode(frame)
            if msg.sender not in sender.expected:
                reason = "unknown_sender"
            elif max(msg.policy_version, getattr(msg, "asked", 0)) > sender.version_bound:
                reason = "version_ahead"
        if reason is not None:
            expected[reason] += 1
        fuzz.send(frame)
        sender._drain(timeout_s=10.0)  # the frame arrives, is handled, nothing else waits
        if sent % PROBE_EVERY == 0:
            hello_is_heard(sent)

    one()
    counted = Counter({reason: int(registry.get_sample_value(
        "asyncrl_learner_messages_rejected_total", {"reason": reason}) or 0)
        for reason in expected})
    assert counted == expected and expected["unknown_sender"] > 0
    assert set(sender.members) <= {"gen0"}  # hostile names never reach the table

    # The sender still does its job: a real generator joins a session and loads a push.
    gen = Generator(0, base, keys=keys)
    gen.start()
    try:
        wait_until(lambda: gen.member is not None, 10, "the generator thread to start")
        wait_until(lambda: sender._drain(0.1) or sender.members["gen0"].incarnation
                   == gen.member.incarnation, 30, "the real generator's hello")
        sender.start()
        model = torch.nn.Linear(3, 2)
        assert sender.sync(model, 1, due=True) is not None
        assert gen.member.version == 1
    finally:
        gen.stop.set()
        gen.join(timeout=10)
        ctx.destroy(linger=0)  # now, not whenever the garbage collector gets to it
    print(f"\nframes fuzzed on the sync control port (+2): {sent}; rejects by reason "
          f"{dict(expected)}; {time.monotonic() - t0:.1f} s")


# ---------------------------------------------------------------- a generator's control socket


class RecordingEngine:
    """The sync calls of VLLMEngine, remembering what it was asked (and never allocating)."""

    def __init__(self):
        self.joined: list[str] = []
        self.received_bytes: list[int] = []

    def init_sync(self, host, port, rank, world_size, backend, timeout_s, prefix):
        self.joined.append(prefix)

    def leave_sync(self):
        pass

    def receive_weights(self, specs, ipc=None, bucket_bytes=None):
        self.received_bytes.append(wire.spec_bytes(specs))
        return 0.0, self.received_bytes[-1]


def test_a_generator_control_socket_survives_hostile_sealed_frames(tmp_path):
    base, t0 = free_base_port(), time.monotonic()
    registry = CollectorRegistry()
    m = metrics.GeneratorMetrics(registry)
    ctx = transport.context()
    keys = transport.load_keys(transport.make_keys(tmp_path / "keys"))
    learner = transport.Server(ctx, HOST, base + 2, keys)  # plays learner rank 0
    engine = RecordingEngine()
    limit = 2**20
    member = SyncMember(transport.Client(ctx, HOST, base + 2, "gen0", keys), engine, "gen0", 1,
                        "inc", HOST, base + 3, "gloo", 5.0, hello_interval_s=3600.0,
                        alone_timeout_s=3600.0,
                        max_weight_bytes=limit, rejected=m.messages_rejected)
    heard: list[dict] = []
    ident = [b""]  # the member's routing id, from its last message

    def listen(until) -> wire.Message:
        """Messages from the member until one satisfies `until`; returns that one."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if learner.sock.poll(100):
                got = learner.recv()
                heard.append(wire.decode(got[1]))
                ident[0] = got[0]
                if until(heard[-1]):
                    return heard[-1]
        raise AssertionError("the generator did not answer")

    member.hello(force=True)
    listen(lambda msg: msg.kind == "generator_hello")
    expected, sent, finished = Counter(), 0, 0

    def join(session: str) -> None:  # the session of the fuzzed weights_update frames
        learner.send(ident[0], wire.encode("sync_join", 0, session=session, world_size=2,
                                           token="t0"))
        member.serve(timeout_s=10.0)
        listen(lambda msg: msg.kind == "generator_hello" and msg.session == session)

    def still_answers(k: int) -> None:
        """A valid join is joined and said back; a valid push to it is loaded and confirmed."""
        session = f"probe.{k}"
        join(session)
        learner.send(ident[0], wire.encode("weights_update", k, session=session,
                                           tensors=[["w", "float32", [4, 4]]], ipc=[],
                                           bucket_bytes=1 << 20, adapter={}))
        member.serve(timeout_s=10.0)
        listen(lambda msg: msg.kind == "weights_loaded" and msg.session == session)
        join("s.1")

    join("s.1")

    @BUDGET
    @given(frame=st.one_of(hostile_frames("sync_join"), hostile_frames("weights_update"),
                           hostile_frames("shutdown")))
    def one(frame: bytes) -> None:
        nonlocal sent, finished
        sent += 1
        reason = _expected_reject(frame, expect=("sync_join", "weights_update", "shutdown",
                                                 "eval_request"))
        if reason is None:
            msg = wire.decode(frame)
            if msg.kind == "weights_update" and msg.session == member.session:
                if wire.spec_bytes(msg.tensors) > limit:
                    reason = "weights_too_large"
                elif msg.adapter:  # this generator trains no adapters
                    reason = "adapter_unexpected"
        if reason is not None:
            expected[reason] += 1
        learner.send(ident[0], frame)
        try:
            member.serve(timeout_s=10.0)
        except LearnerFinished:  # a valid shutdown: the generator would exit, as it should
            finished += 1
        if sent % PROBE_EVERY == 0:
            still_answers(sent)

    one()
    # And one push that is valid on the wire but larger than this model can hold, whatever the
    # random draws above happened to contain.
    join("s.1")
    learner.send(ident[0], wire.encode("weights_update", 9, session="s.1",
                                       tensors=[["w", "float32", [2**18, 2**18]]], ipc=[],
                                       bucket_bytes=1 << 20, adapter={}))
    member.serve(timeout_s=10.0)
    expected["weights_too_large"] += 1
    ctx.destroy(linger=0)
    counted = Counter({reason: int(registry.get_sample_value(
        "asyncrl_generator_messages_rejected_total", {"reason": reason}) or 0)
        for reason in expected})
    assert counted == expected and expected["weights_too_large"] > 0
    assert max(engine.received_bytes) <= limit  # never asked to allocate more than its model
    print(f"\nframes fuzzed on a generator's control socket: {sent} ({finished} valid "
          f"shutdowns); rejects by reason {dict(expected)}; {time.monotonic() - t0:.1f} s")
