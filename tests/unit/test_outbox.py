"""The pipelined outbox against the real buffer handler: with a window of messages in flight,
busy answers, lost replies and resends, every message is stored exactly once and in order."""

import random

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from asyncrl import wire
from asyncrl.buffer.durable import DurableLog
from asyncrl.buffer.main import BufferHandler
from asyncrl.buffer.store import ReplayBuffer
from asyncrl.generator.outbox import BufferRejected, Outbox
from asyncrl.metrics import BufferMetrics


def _frame(seq, incarnation="i"):
    comps = [wire.Completion(np.array([3], np.int32), np.array([-0.5], np.float32), r, "stop")
             for r in (0.0, 1.0)]
    g = wire.TrajectoryGroup(seq, np.array([1], np.int32), 0, comps, "gen0", 0.0)
    return wire.encode("trajectories", 0, sender="gen0", incarnation=incarnation, seq=seq,
                       groups=[g])


class LossyClient:
    """Delivers each frame to the handler; drops a share of requests and of replies."""

    def __init__(self, handler, rng, drop=0.0):
        self.handler, self.rng, self.drop = handler, rng, drop
        self.replies = []

    def send(self, payload):
        if self.rng.random() < self.drop:
            return  # lost on the way
        reply = self.handler.on_trajectories(payload)
        if self.rng.random() >= self.drop:
            self.replies.append(reply)

    def poll(self, timeout_s):
        return self.replies.pop(0) if self.replies else None


def _handler(capacity, tmp_path):
    """A durable buffer: it knows every stream, so each must start at seq 1."""
    return BufferHandler(ReplayBuffer(capacity, max_staleness=10**6),
                         BufferMetrics(CollectorRegistry()), None,
                         DurableLog(tmp_path / "log.bin"))


@pytest.mark.parametrize("drop", [0.0, 0.3])
def test_window_of_messages_with_busy_and_losses_is_stored_exactly_once_in_order(drop,
                                                                                tmp_path):
    rng = random.Random(1)
    handler = _handler(5, tmp_path)
    t = [0.0]
    acked, busy = [], []
    box = Outbox(LossyClient(handler, rng, drop), window=4, timeout_s=1.0,
                 ready_timeout_s=10**6, on_acked=lambda s, n: acked.append(s),
                 on_busy=lambda: busy.append(1), where="test", clock=lambda: t[0])
    seq, taken = 0, []
    while len(acked) < 40:
        while not box.full() and seq < 40:
            seq += 1
            box.put(seq, _frame(seq), 1)
        box.pump()
        t[0] += 0.3
        if rng.random() < 0.3:  # the learner takes what is there now and then
            taken += [g.prompt_id for g in handler.store.take(len(handler.store), 0).groups]
    taken += [g.prompt_id for g in handler.store.take(len(handler.store), 0).groups]
    assert acked == list(range(1, 41))
    assert taken == list(range(1, 41))  # every message once, in order
    assert busy  # the small buffer pushed back


def test_a_rejected_message_raises(tmp_path):
    handler = _handler(5, tmp_path)
    box = Outbox(LossyClient(handler, random.Random(0)), window=2, timeout_s=1.0,
                 ready_timeout_s=10.0, on_acked=lambda s, n: None, on_busy=lambda: None,
                 where="test")
    with pytest.raises(BufferRejected):
        box.put(1, b"ARL1garbage", 1)
        box.pump()


def test_silence_past_the_ready_timeout_names_the_setting():
    class Deaf:
        def send(self, payload):
            pass

        def poll(self, timeout_s):
            return None

    t = [0.0]
    box = Outbox(Deaf(), window=2, timeout_s=1.0, ready_timeout_s=5.0,
                 on_acked=lambda s, n: None, on_busy=lambda: None, where="host:1",
                 clock=lambda: t[0])
    box.put(1, _frame(1), 1)
    t[0] = 6.0
    with pytest.raises(TimeoutError, match="net.ready_timeout_s"):
        box.pump()


def test_a_durable_buffer_takes_each_stream_in_order_from_seq_1(tmp_path):
    handler = _handler(10, tmp_path)
    assert wire.decode(handler.on_trajectories(_frame(2))).status == "busy"  # 1 first
    assert wire.decode(handler.on_trajectories(_frame(1))).status == "ok"
    assert wire.decode(handler.on_trajectories(_frame(3))).reason.startswith("out of order")
    assert wire.decode(handler.on_trajectories(_frame(2))).status == "ok"
    assert wire.decode(handler.on_trajectories(_frame(1))).reason == "duplicate"
    assert [g.prompt_id for g in handler.store.held()] == [1, 2]
