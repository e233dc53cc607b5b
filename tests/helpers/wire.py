"""Wire frames for tests that talk to a buffer directly."""

import numpy as np

from asyncrl import wire


def traj_frame(seq, pid, version=0, sender="gen0"):
    """A trajectories message of one group from `sender` (the role whose key sends it)."""
    comps = [wire.Completion(np.array([3], np.int32), np.array([-0.5], np.float32), r, "stop")
             for r in (0.0, 1.0)]
    g = wire.TrajectoryGroup(pid, np.array([1], np.int32), version, comps, sender, 0.0)
    return wire.encode("trajectories", version, sender=sender, incarnation="i", seq=seq,
                       groups=[g])
