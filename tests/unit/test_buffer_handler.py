"""The buffer's request handling: every frame gets a reply, bad ones are counted by reason."""

import numpy as np
from prometheus_client import CollectorRegistry

from asyncrl import wire
from asyncrl.buffer.main import BufferHandler
from asyncrl.buffer.store import ReplayBuffer
from asyncrl.metrics import BufferMetrics


def _handler(capacity=4, staleness=1):
    reg = CollectorRegistry()
    return BufferHandler(ReplayBuffer(capacity, staleness), BufferMetrics(reg), vocab_size=50), reg


def _traj(seq, version=0, n_groups=1, token=3):
    comps = [wire.Completion(np.array([token], np.int32), np.array([-0.5], np.float32), r, "stop")
             for r in (0.0, 1.0)]
    groups = [wire.TrajectoryGroup(i, np.array([1], np.int32), version, comps, "g", 0.0)
              for i in range(n_groups)]
    return wire.encode("trajectories", version, sender="g", incarnation="i1", seq=seq,
                       groups=groups)


def _val(reg, name, **labels):
    return reg.get_sample_value(name, labels) or 0.0


def test_accepts_acks_and_serves_batches():
    h, reg = _handler()
    ack = wire.decode(h.on_trajectories(_traj(1, n_groups=2)))
    assert (ack.seq, ack.status) == (1, "ok")
    batch = wire.decode(h.on_batch_request(wire.encode("batch_request", 0, rank=0, num_groups=2)))
    assert batch.status == "ok" and len(batch.groups) == 2
    assert _val(reg, "asyncrl_buffer_trajectories_received_total") == 4
    assert _val(reg, "asyncrl_buffer_trajectories_served_total") == 4


def test_not_ready_until_enough_groups():
    h, _ = _handler()
    h.on_trajectories(_traj(1))
    batch = wire.decode(h.on_batch_request(wire.encode("batch_request", 0, rank=0, num_groups=2)))
    assert batch.status == "not_ready" and batch.groups == []


def test_full_buffer_answers_busy_and_keeps_what_it_has():
    h, reg = _handler(capacity=2)
    assert wire.decode(h.on_trajectories(_traj(1, n_groups=2))).status == "ok"
    assert wire.decode(h.on_trajectories(_traj(2))).status == "busy"
    assert len(h.store) == 2 and _val(reg, "asyncrl_buffer_busy_replies_total") == 1


def test_bad_frames_get_a_rejected_reply_and_a_counter_by_reason():
    h, reg = _handler()
    replies = [h.on_trajectories(b"\x00\xff junk"), h.on_trajectories(_traj(1, token=999)),
               h.on_batch_request(b"")]
    assert wire.decode(replies[0]).status == "rejected"
    assert "bad_token" in wire.decode(replies[1]).reason
    assert wire.decode(replies[2]).kind == "error"
    assert _val(reg, "asyncrl_buffer_messages_rejected_total", reason="bad_token") == 1
    assert _val(reg, "asyncrl_buffer_messages_rejected_total", reason="bad_magic") == 2
    assert len(h.store) == 0


def test_stale_groups_are_dropped_and_counted_on_request():
    h, reg = _handler(staleness=1)
    h.on_trajectories(_traj(1, version=0))
    h.on_trajectories(_traj(2, version=2))
    batch = wire.decode(h.on_batch_request(wire.encode("batch_request", 2, rank=0, num_groups=1)))
    assert [g.policy_version for g in batch.groups] == [2]
    assert batch.stale_dropped_total == 2
    assert _val(reg, "asyncrl_buffer_stale_dropped_trajectories_total") == 2


def test_a_resent_message_is_acked_but_stored_once():
    h, reg = _handler()
    frame = _traj(7)
    assert wire.decode(h.on_trajectories(frame)).status == "ok"
    again = wire.decode(h.on_trajectories(frame))  # the generator missed the first ack
    assert (again.status, again.reason) == ("ok", "duplicate")
    assert len(h.store) == 1
    assert _val(reg, "asyncrl_buffer_duplicate_messages_total") == 1
