import numpy as np

from asyncrl.buffer.store import ReplayBuffer
from asyncrl.wire import Completion, TrajectoryGroup


def g(version, pid=0, n=4):
    comps = [Completion(np.array([1], np.int32), np.array([-0.1], np.float32), 0.0, "stop")
             for _ in range(n)]
    return TrajectoryGroup(pid, np.array([1, 2], np.int32), version, comps, "gen0", 0.0)


def test_groups_stay_whole_and_come_out_oldest_first():
    buf = ReplayBuffer(capacity_groups=10, max_staleness=5)
    assert buf.add([g(0, pid=i) for i in range(3)])
    res = buf.take(2, learner_version=0)
    assert [x.prompt_id for x in res.groups] == [0, 1]
    assert all(len(x.completions) == 4 for x in res.groups)
    assert len(buf) == 1


def test_too_few_groups_takes_nothing():
    buf = ReplayBuffer(10, 5)
    buf.add([g(0)])
    assert buf.take(2, 0).groups == []
    assert len(buf) == 1


def test_staleness_filter_drops_and_counts_old_groups():
    buf = ReplayBuffer(10, max_staleness=1)
    buf.add([g(0, 0), g(1, 1), g(2, 2), g(3, 3)])
    res = buf.take(2, learner_version=3)  # usable: versions >= 2
    assert [x.policy_version for x in res.groups] == [2, 3]
    assert res.stale_dropped_groups == 2 and res.stale_dropped_trajectories == 8
    assert buf.stale_dropped_trajectories_total == 8


def test_max_staleness_zero_serves_only_the_current_version():
    buf = ReplayBuffer(10, max_staleness=0)
    buf.add([g(4), g(5), g(5)])
    res = buf.take(2, learner_version=5)
    assert {x.policy_version for x in res.groups} == {5}


def test_full_buffer_refuses_whole_message_without_dropping():
    buf = ReplayBuffer(capacity_groups=3, max_staleness=5)
    assert buf.add([g(0), g(0)])
    assert buf.add([g(0), g(0)])  # below the limit when it came: taken whole (4 of 3)
    assert not buf.add([g(0)])  # at or past the limit: refused, nothing of it is taken
    assert len(buf) == 4
    buf.take(2, learner_version=0)
    assert buf.add([g(0)])
    assert len(buf) == 3


def test_learner_version_never_goes_backwards():
    buf = ReplayBuffer(10, max_staleness=0)
    buf.take(1, learner_version=5)
    buf.add([g(4)])
    assert buf.take(1, learner_version=2).groups == []  # a lagging rank cannot revive old data
    assert buf.stale_dropped_groups_total == 1


def test_trajectory_count_follows_adds_takes_and_drops():
    buf = ReplayBuffer(10, max_staleness=1)
    buf.add([g(0, n=4), g(2, n=3), g(3, n=2)])
    assert buf.num_trajectories == 9
    buf.take(1, learner_version=3)  # drops version 0 (4), takes version 2 (3)
    assert buf.num_trajectories == 2
