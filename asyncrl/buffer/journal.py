"""The buffer's delivery journal: readable proof of exactly-once delivery from the run directory.

Every group has an identity, (sender, incarnation, seq, index): the generator process that sent
it (a restarted generator is a new incarnation), the message's sequence number in that stream,
and the group's place in the message. The buffer stamps it on every group it accepts, the batch
carries it to the learner, and three journals record it:
  RUN_DIR/buffer/accepted.jsonl  one row per accepted message: sender, incarnation, seq, groups
  RUN_DIR/buffer/dropped.jsonl   one row per batch request that dropped stale groups: their ids
  RUN_DIR/admission.jsonl        (the learner's) every group trained, with its identity
A journal row is written before the durable-log record it describes, so a crash between the two
can only leave a row whose message is then resent and accepted again under the same identity:
readers take identities as a set. `asyncrl.audit` puts them together.
"""

from __future__ import annotations

import json
from pathlib import Path

from asyncrl.wire import TrajectoryGroup


def identity(g: TrajectoryGroup) -> tuple[str, str, int, int]:
    return (g.generator, g.incarnation, g.seq, g.index)


class DeliveryJournal:
    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self._accepted = (directory / "accepted.jsonl").open("a")
        self._dropped = (directory / "dropped.jsonl").open("a")

    def accepted(self, sender: str, incarnation: str, seq: int, num_groups: int) -> None:
        self._write(self._accepted, {"sender": sender, "incarnation": incarnation, "seq": seq,
                                     "groups": num_groups})

    def dropped(self, groups: list[TrajectoryGroup]) -> None:
        if groups:
            self._write(self._dropped, {"groups": [list(identity(g)) for g in groups]})

    @staticmethod
    def _write(f, row: dict) -> None:
        f.write(json.dumps(row) + "\n")
        f.flush()
