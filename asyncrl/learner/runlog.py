"""What a learner run leaves behind to be replayed: the batch log and the weights' checksum."""

from __future__ import annotations

import json
from pathlib import Path

from asyncrl import wire
from asyncrl.jsonl import read_jsonl


def weights_sha256(model) -> str:
    """Checksum of every tensor's bytes in state_dict order: equal iff the weights are. Works for
    every dtype (numpy has no bfloat16, so the bytes are read as uint8) and device. For a model
    sharded by FSDP use named_sha256(shard.full_tensors(model)) on every rank."""
    return named_sha256(model.state_dict().items())


def named_sha256(named) -> str:
    """weights_sha256 of (name, tensor) pairs, taken one at a time (a sharded model's are
    gathered as they come, asyncrl/learner/shard.py)."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, t in named:
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class BatchLog:
    """Every batch this rank trained on, in order, as wire `batch` frames (length-prefixed) in
    RUN_DIR/batches/rank<r>.bin, plus a readable admission log (RUN_DIR/admission.jsonl:
    step, rank, and each group's generator, prompt id, policy version and the rest of its
    identity: incarnation, seq, index; see asyncrl/buffer/journal.py). With it a finished
    async run replays on the learner alone (`asyncrl replay RUN_DIR`), and a restarted learner
    replays the steps after its checkpoint (`logged`). A frame is written before its step is
    trained, so every batch taken from the buffer is in the log; a torn last frame (killed
    mid-write) is cut off when the log is reopened."""

    def __init__(self, run_dir: Path, rank: int, resume_step: int = 0):
        path = run_dir / "batches" / f"rank{rank}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.logged: dict[int, tuple[list, int]] = {}  # step -> (groups, stale_dropped_total)
        end = 0
        if path.is_file():
            for frame_end, step, msg in _frames(path.read_bytes()):
                end = frame_end
                if step > resume_step:
                    self.logged[step] = (msg.groups, msg.stale_dropped_total)
            if end < path.stat().st_size:
                with path.open("r+b") as f:
                    f.truncate(end)
        if self.logged and sorted(self.logged) != list(range(resume_step + 1,
                                                             max(self.logged) + 1)):
            raise RuntimeError(f"{path}: logged steps {sorted(self.logged)} after checkpoint "
                               f"step {resume_step} are not consecutive")
        self.bin = path.open("ab")
        self.jsonl = (run_dir / "admission.jsonl").open("a")
        self.rank = rank
        if self.logged:  # the row of the last logged step may not have been written
            last = max(self.logged)
            if not any(r["step"] == last and r["rank"] == rank
                       for r in read_jsonl(run_dir / "admission.jsonl")):
                self._admit(last, self.logged[last][0])

    def append(self, step: int, groups: list, dropped_total: int) -> None:
        frame = wire.encode("batch", step - 1, status="ok", groups=groups,
                            stale_dropped_total=dropped_total)
        self.bin.write(len(frame).to_bytes(8, "little") + frame)
        self.bin.flush()
        self._admit(step, groups)

    def _admit(self, step: int, groups: list) -> None:
        self.jsonl.write(json.dumps({"step": step, "rank": self.rank, "groups": [
            [g.generator, g.prompt_id, g.policy_version, g.incarnation, g.seq, g.index]
            for g in groups]}) + "\n")
        self.jsonl.flush()


def _frames(data: bytes):
    """(end offset, step, message) of each complete frame; stops at a torn or corrupt one."""
    off = 0
    while off + 8 <= len(data):
        n = int.from_bytes(data[off : off + 8], "little")
        if off + 8 + n > len(data):
            return
        try:
            msg = wire.decode(data[off + 8 : off + 8 + n], expect=("batch",))
        except wire.MessageError as e:
            if e.reason == "schema_version":  # not torn: written by another asyncrl version
                raise RuntimeError(f"batch log frame at byte {off}: {e}; resume or replay this "
                                   "run with the asyncrl version that wrote it") from None
            return
        off += 8 + n
        yield off, msg.policy_version + 1, msg


def read_batch_log(path: Path):
    """Yield the groups of each logged step, in order."""
    for _, _, msg in _frames(path.read_bytes()):
        yield msg.groups
