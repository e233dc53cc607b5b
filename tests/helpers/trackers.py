"""Reading back what the trackers wrote, each through its own reader: TensorBoard's
EventAccumulator, MLflow's client, and wandb's offline run file (its records, in the LevelDB
log format wandb documents for `.wandb` files, parsed as the protobuf records they are)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path


def tensorboard_series(run_dir: Path, key: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = []
    for d in sorted({p.parent for p in (Path(run_dir) / "trackers" / "tensorboard").rglob(
            "events.out.tfevents.*")}):
        acc = EventAccumulator(str(d), size_guidance={"scalars": 0})
        acc.Reload()
        if key in acc.Tags()["scalars"]:
            points += [(e.step, e.value) for e in acc.Scalars(key)]
    return sorted(points)


def mlflow_series(run_dir: Path, key: str) -> list[tuple[int, float]]:
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    state = json.loads((Path(run_dir) / "trackers" / "state.json").read_text())
    client = MlflowClient((Path(run_dir) / "trackers" / "mlruns").resolve().as_uri())
    return sorted((m.step, m.value) for m in
                  client.get_metric_history(state["mlflow_run_id"], key.replace("/", ".")))


def _records(path: Path):
    """The records of a .wandb file: a 7-byte header (':W&B', magic, version), then 32 KiB
    blocks of chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            yield parts
            parts = b""


def wandb_history(run_dir: Path) -> list[dict]:
    """Every history row of every offline wandb run of the run, in the order logged."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for f in sorted((Path(run_dir) / "trackers" / "wandb").glob("offline-run-*/run-*.wandb")):
        for raw in _records(f):
            r = pb.Record()
            r.ParseFromString(raw)
            if r.WhichOneof("record_type") == "history":
                row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                       for i in r.history.item}
                rows.append(row)
    return rows


def wandb_series(run_dir: Path, key: str) -> list[tuple[int, float]]:
    return [(r["_step"], r[key]) for r in wandb_history(run_dir) if key in r]
