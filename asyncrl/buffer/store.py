"""The replay buffer's logic, free of sockets: whole groups in FIFO order, a staleness bound,
a capacity that pushes back instead of dropping."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from asyncrl.wire import TrajectoryGroup


@dataclass
class TakeResult:
    groups: list[TrajectoryGroup]
    dropped: list[TrajectoryGroup]  # groups dropped as stale on the way

    @property
    def stale_dropped_groups(self) -> int:
        return len(self.dropped)

    @property
    def stale_dropped_trajectories(self) -> int:
        return sum(len(g.completions) for g in self.dropped)


class ReplayBuffer:
    """Holds whole GRPO groups (never splits one: its advantages need all its members).

    A group sampled under version v is usable by a learner at version L while
    L - v <= max_staleness; older groups are dropped and counted when the learner asks.
    `add` is all-or-nothing and refuses once the buffer holds `capacity_groups` groups: the
    generator gets "busy", waits and retries (back-pressure), and nothing is lost. A message
    that arrives below the limit is taken whole, so the buffer may go past the limit by less
    than one message: a streaming generator's messages hold however many groups finished
    together, and refusing one that did not fit exactly could leave the buffer short of a
    learner batch forever (e.g. 14 groups held, 16 wanted, a message of 3 refused again and again).
    """

    def __init__(self, capacity_groups: int, max_staleness: int):
        self.capacity_groups = capacity_groups
        self.max_staleness = max_staleness
        self._groups: deque[TrajectoryGroup] = deque()
        self.stale_dropped_groups_total = 0
        self.stale_dropped_trajectories_total = 0
        self.learner_version = 0
        self.num_trajectories = 0  # kept up to date: counting on every message would be O(n)

    def __len__(self) -> int:
        return len(self._groups)

    def add(self, groups: list[TrajectoryGroup], force: bool = False) -> bool:
        """Append the groups, or refuse all of them (False) when they do not fit. `force`
        skips the admission limit (recovery re-adds what was already acknowledged)."""
        if not force and len(self._groups) >= self.capacity_groups:
            return False
        self._groups.extend(groups)
        self.num_trajectories += sum(len(g.completions) for g in groups)
        return True

    def drop_stale(self, learner_version: int) -> list[TrajectoryGroup]:
        """Remove every group older than the staleness bound, and return them."""
        self.learner_version = max(self.learner_version, learner_version)
        oldest_ok = self.learner_version - self.max_staleness
        keep = [g for g in self._groups if g.policy_version >= oldest_ok]
        dropped = [g for g in self._groups if g.policy_version < oldest_ok]
        if dropped:
            self._groups = deque(keep)
        n_traj = sum(len(g.completions) for g in dropped)
        self.num_trajectories -= n_traj
        self.stale_dropped_groups_total += len(dropped)
        self.stale_dropped_trajectories_total += n_traj
        return dropped

    def take(self, num_groups: int, learner_version: int) -> TakeResult:
        """The oldest `num_groups` usable groups; none at all if fewer are available."""
        dropped = self.drop_stale(learner_version)
        if len(self._groups) < num_groups:
            return TakeResult([], dropped)
        out = [self._groups.popleft() for _ in range(num_groups)]
        self.num_trajectories -= sum(len(g.completions) for g in out)
        return TakeResult(out, dropped)

    def held(self) -> list[TrajectoryGroup]:
        """The groups held, oldest first (a copy)."""
        return list(self._groups)
