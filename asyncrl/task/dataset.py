"""Prompt/answer records from a local JSONL or Parquet file (e.g. a math dataset on disk)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from asyncrl.task.addition import Problem


def read_records(path: str | Path) -> list[dict]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"task.path={str(path)!r} does not exist")
    if path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON ({e})") from None
        return records
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError("reading Parquet needs pyarrow: pip install pyarrow") from None
        return pq.read_table(path).to_pylist()
    raise ValueError(f"task.path={str(path)!r}: expected a .jsonl or .parquet file")


def load_dataset(path: str | Path, prompt_field: str, answer_field: str, eval_size: int,
                 seed: int) -> tuple[list[Problem], list[Problem]]:
    """(train, eval): records shuffled with `seed`, the first eval_size held out."""
    records = read_records(path)
    for i, r in enumerate(records):
        missing = [f for f in (prompt_field, answer_field) if f not in r]
        if missing:
            raise ValueError(f"{path}: record {i} has no field {missing[0]!r} "
                             "(task.prompt_field / task.answer_field)")
    if len(records) <= eval_size:
        raise ValueError(f"{path} has {len(records)} records, not more than "
                         f"task.eval_size={eval_size}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    problems = [Problem(i, str(records[i][prompt_field]), str(records[i][answer_field]))
                for i in order]
    return problems[eval_size:], problems[:eval_size]
