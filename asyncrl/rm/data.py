"""Reward-model training data from JSONL: preference pairs (prompt, chosen, rejected, an
optional margin) for the pair-wise loss, or scored responses (prompt, response, score) for the
point-wise one. A bad row (not JSON, a missing or non-text field, an empty response, a pair
whose two responses are the same, a score that is not a finite number) is counted by reason
and skipped, never fatal; a file with no usable row is refused, naming it and the reasons."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


class RmDataError(ValueError):
    """Reward-model data that cannot be used at all."""


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str
    margin: float = 0.0


@dataclass(frozen=True)
class Scored:
    prompt: str
    response: str
    score: float


@dataclass
class RmData:
    kind: str  # "pairwise" or "pointwise"
    rows: list = field(default_factory=list)
    bad: Counter = field(default_factory=Counter)

    def report(self) -> str:
        skipped = sum(self.bad.values())
        why = ", ".join(f"{n} {reason}" for reason, n in self.bad.most_common())
        return f"{len(self.rows)} usable {self.kind} rows" + (
            f"; {skipped} skipped ({why})" if skipped else "")


FIELDS = {"pairwise": ("prompt", "chosen", "rejected"), "pointwise": ("prompt", "response")}


def kind_of(record: dict, loss: str) -> str:
    if loss != "auto":
        return loss
    return "pairwise" if "chosen" in record or "rejected" in record else "pointwise"


def parse_row(record, kind: str, margin: float) -> Pair | Scored | str:
    """One row, or why it is bad."""
    if not isinstance(record, dict):
        return "not a JSON object"
    for name in FIELDS[kind]:
        if name not in record:
            return f"missing {name}"
        if not isinstance(record[name], str):
            return f"{name} not text"
    responses = FIELDS[kind][1:]
    if any(not record[r].strip() for r in responses):
        return "empty response"
    if kind == "pairwise":
        m = record.get("margin", margin)
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
            return "margin not a finite number"
        if record["chosen"] == record["rejected"]:
            return "chosen equals rejected"
        return Pair(record["prompt"], record["chosen"], record["rejected"], float(m))
    s = record.get("score")
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
        return "score missing or not a finite number"
    return Scored(record["prompt"], record["response"], float(s))


def read_rm_data(path: str | Path, loss: str = "auto", margin: float = 0.0) -> RmData:
    """Every usable row of a JSONL file; the kind from `loss` or, with auto, from the first
    JSON object's fields."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise RmDataError(f"rm.data={str(path)!r}: no such file")
    data: RmData | None = None
    early = Counter()  # bad rows before the kind is known
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                (data.bad if data else early)["not JSON"] += 1
                continue
            if data is None and isinstance(record, dict):
                data = RmData(kind_of(record, loss), bad=early)
            if data is None:
                early["not a JSON object"] += 1
                continue
            row = parse_row(record, data.kind, margin)
            if isinstance(row, str):
                data.bad[row] += 1
            else:
                data.rows.append(row)
    if data is None or not data.rows:
        why = (data.bad if data else early) or {"the file is empty": 1}
        raise RmDataError(f"rm.data={str(path)!r}: no usable row ("
                          + ", ".join(f"{n} {r}" for r, n in Counter(why).most_common()) + ")")
    return data
