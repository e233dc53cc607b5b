"""Wire frames for tests that talk to a buffer directly."""

import numpy as np

from asyncrl import wire


def traj_frame(seq, pid, version=0):
    comps = [wire.Completion(np.array([3], np.int32), np.array([-0.5], np.float32), r, "stop")
             for r in (0.0, 1.0)]
    g = wire.TrajectoryGroup(pid, np.array([1], np.int32), version, comps, "g", 0.0)
    return wire.encode("trajectories", version, sender="g", incarnation="i", seq=seq, groups=[g])
