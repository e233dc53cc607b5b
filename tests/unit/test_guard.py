"""What a role does with frames that would stall a run or fill its disk, from a peer holding a
valid key: refused and counted by reason, logged at a bounded rate (asyncrl/guard.py, the
buffer's handler, the learner's weight-sync control)."""

import logging

import numpy as np
from prometheus_client import CollectorRegistry

from asyncrl import wire
from asyncrl.buffer.main import BufferHandler, Liveness
from asyncrl.buffer.store import ReplayBuffer
from asyncrl.guard import NewStreams, RefusalLog
from asyncrl.metrics import BufferMetrics


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _traj(seq, sender="gen0", incarnation="i1"):
    comps = [wire.Completion(np.array([3], np.int32), np.array([-0.5], np.float32), r, "stop")
             for r in (0.0, 1.0)]
    group = wire.TrajectoryGroup(0, np.array([1], np.int32), 0, comps, sender, 0.0)
    return wire.encode("trajectories", 0, sender=sender, incarnation=incarnation, seq=seq,
                       groups=[group])


def _handler(**kw):
    reg = CollectorRegistry()
    return BufferHandler(ReplayBuffer(64, 2), BufferMetrics(reg), 50, **kw), reg


def _rejected(reg, reason):
    return reg.get_sample_value("asyncrl_buffer_messages_rejected_total", {"reason": reason})


def test_a_flood_of_refusals_logs_one_line_then_one_a_minute(caplog):
    clock = Clock()
    refusals = RefusalLog(logging.getLogger("t"), "buffer", interval_s=60, clock=clock)
    with caplog.at_level(logging.WARNING, "t"):
        for i in range(10_001):
            clock.t = i * 0.006  # 10,001 frames in 60 s
            refusals.refused("bad_token", "gen0", "token 999 outside the vocabulary")
        refusals.refused("bad_crc", "gen0", "x")  # another reason: its own first line
        refusals.refused("bad_token", "gen1", "x")  # another peer: its own first line
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4, lines
    assert "refused 10000 more frames from gen0 (bad_token) in 60s" in lines[1], lines


def test_new_incarnations_are_bounded_per_sender_within_the_window():
    clock = Clock()
    streams = NewStreams(limit=3, window_s=600, clock=clock)
    opened = []
    for _ in range(4):
        opened.append(streams.allows("gen0"))
        if opened[-1]:
            streams.opened("gen0")
    assert opened == [True, True, True, False]
    assert streams.allows("gen1")  # per sender
    clock.t = 601
    assert streams.allows("gen0")  # the window moved on


def test_the_buffer_refuses_a_sender_that_is_not_the_key_holder():
    h, reg = _handler()
    ack = wire.decode(h.on_trajectories(_traj(1, sender="gen1"), role="gen0"))
    assert ack.status == "rejected" and "sender_mismatch" in ack.reason
    assert len(h.store) == 0 and _rejected(reg, "sender_mismatch") == 1
    assert wire.decode(h.on_trajectories(_traj(1), role="gen0")).status == "ok"


def test_a_batch_request_ahead_of_the_run_is_refused_not_obeyed():
    """A batch_request at a version near 2**40 would make the buffer drop every group as
    stale; past learner.total_steps no learner asks, so it is refused and nothing drops."""
    h, reg = _handler(max_version=150)
    for seq in (1, 2):
        h.on_trajectories(_traj(seq))
    reply = wire.decode(h.on_batch_request(wire.encode("batch_request", 2**40 - 2, rank=0,
                                                       num_groups=1)))
    assert reply.kind == "error" and "version_ahead" in reply.reason
    assert len(h.store) == 2 and _rejected(reg, "version_ahead") == 1
    assert h.store.stale_dropped_trajectories_total == 0
    ok = wire.decode(h.on_batch_request(wire.encode("batch_request", 150, rank=0,
                                                    num_groups=1)))
    assert ok.kind == "batch"


def test_incarnations_past_the_bound_are_refused_and_counted():
    h, reg = _handler()
    limit = h.streams.limit
    acks = [wire.decode(h.on_trajectories(_traj(1, incarnation=f"i{k}"), role="gen0"))
            for k in range(limit + 5)]
    assert [a.status for a in acks] == ["ok"] * limit + ["rejected"] * 5
    # only streams stored count: first messages answered "busy" (a full buffer) open none
    h2 = BufferHandler(ReplayBuffer(1, 2), BufferMetrics(CollectorRegistry()), 50)
    assert wire.decode(h2.on_trajectories(_traj(1, incarnation="j"))).status == "ok"
    for k in range(limit + 5):
        assert wire.decode(h2.on_trajectories(_traj(1, incarnation=f"j{k}"))).status == "busy"
    h2.on_batch_request(wire.encode("batch_request", 0, rank=0, num_groups=1))
    assert wire.decode(h2.on_trajectories(_traj(1, incarnation="j0"))).status == "ok"
    assert len(h.accepted_seq) == limit and _rejected(reg, "too_many_incarnations") == 5
    # a stream it already knows goes on
    assert wire.decode(h.on_trajectories(_traj(2, incarnation="i0"), role="gen0")).status == "ok"


def test_a_heartbeat_in_another_roles_name_is_refused():
    reg = CollectorRegistry()
    live = Liveness(5.0, BufferMetrics(reg))
    live.on_heartbeat(wire.encode("heartbeat", 0, sender="learner0", role="learner"), "gen0")
    live.on_heartbeat(wire.encode("heartbeat", 0, sender="learner1", role="learner"), "learner")
    live.on_heartbeat(wire.encode("heartbeat", 0, sender="gen0", role="generator"), "gen0")
    assert set(live.last_seen) == {"learner1", "gen0"}
    assert _rejected(reg, "sender_mismatch") == 1


def test_the_learner_refuses_hellos_that_would_stop_its_pushes(tmp_path):
    """At the weight-sync control port: a hello at a version far ahead (versions never move
    back, so no push would go out again), a hello in another generator's name, and a flood of
    new incarnations (each re-forms the session) are refused and counted; the generator's own
    hello is heard."""
    from asyncrl import transport
    from asyncrl.metrics import LearnerMetrics
    from asyncrl.sync.sender import WeightSender
    from tests.conftest import free_base_port

    d = transport.make_keys(tmp_path / "keys", transport.client_roles(2))
    base, ctx, reg = free_base_port(), transport.context(), CollectorRegistry()
    m = LearnerMetrics(reg)
    server = transport.Server(ctx, "127.0.0.1", base + 2, transport.load_keys(d, "learner"),
                              allow=(transport.GENERATORS,))
    sender = WeightSender(server, "127.0.0.1", base + 3, 2, "gloo", 30.0, 30.0,
                          rejected=m.messages_rejected)
    sender.version_bound = 5
    gen0 = transport.Client(ctx, "127.0.0.1", base + 2, "gen0", transport.load_keys(d, "gen0"))

    def hello(version, sender_name="gen0", incarnation="inc0"):
        gen0.send(wire.encode("generator_hello", version, sender=sender_name, sync_rank=1,
                              incarnation=incarnation, session=""))
        sender._drain(timeout_s=10.0)

    def rejected(reason):
        return reg.get_sample_value("asyncrl_learner_messages_rejected_total",
                                    {"reason": reason}) or 0

    hello(2**40 - 1)
    assert "gen0" not in sender.members and rejected("version_ahead") == 1
    hello(3, sender_name="gen1")
    assert "gen1" not in sender.members and rejected("sender_mismatch") == 1
    hello(3)
    assert sender.members["gen0"].version == 3
    # another incarnation under gen0's name while gen0 speaks: refused, gen0 stays
    for k in range(5):
        hello(3, incarnation=f"flood{k}")
    assert rejected("incarnation_conflict") == 5
    assert sender.members["gen0"].incarnation == "inc0"
    # restarts (the old incarnation silent): taken, up to the bound
    sender.live_s = 0.0
    for k in range(sender.streams.limit + 3):
        hello(3, incarnation=f"restart{k}")
    assert rejected("too_many_incarnations") == 4  # the first hello opened one of the limit
    assert sender.members["gen0"].incarnation == f"restart{sender.streams.limit - 2}"
    server.close()
