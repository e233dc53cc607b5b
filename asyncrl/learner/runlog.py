"""What a learner run leaves behind to be replayed: the batch log and the weights' checksum."""

from __future__ import annotations

import json
from pathlib import Path

from asyncrl import wire


def weights_sha256(model) -> str:
    """Checksum of every tensor's bytes in state_dict order: equal iff the weights are."""
    import hashlib

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class BatchLog:
    """Every batch this rank trained on, in order, as wire `batch` frames (length-prefixed) in
    RUN_DIR/batches/rank<r>.bin, plus a readable admission log (RUN_DIR/admission.jsonl:
    step, rank, and each group's generator, prompt id and policy version). With it a finished
    async run replays on the learner alone (`asyncrl replay RUN_DIR`)."""

    def __init__(self, run_dir: Path, rank: int):
        (run_dir / "batches").mkdir(parents=True, exist_ok=True)
        self.bin = (run_dir / "batches" / f"rank{rank}.bin").open("ab")
        self.jsonl = (run_dir / "admission.jsonl").open("a")
        self.rank = rank

    def append(self, step: int, groups: list, dropped_total: int) -> None:
        frame = wire.encode("batch", step - 1, status="ok", groups=groups,
                            stale_dropped_total=dropped_total)
        self.bin.write(len(frame).to_bytes(8, "little") + frame)
        self.bin.flush()
        self.jsonl.write(json.dumps({"step": step, "rank": self.rank, "groups": [
            [g.generator, g.prompt_id, g.policy_version] for g in groups]}) + "\n")
        self.jsonl.flush()


def read_batch_log(path: Path):
    """Yield the groups of each logged step, in order."""
    data = path.read_bytes()
    off = 0
    while off < len(data):
        n = int.from_bytes(data[off : off + 8], "little")
        yield wire.decode(data[off + 8 : off + 8 + n])["groups"]
        off += 8 + n
