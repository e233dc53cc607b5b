"""JSON-lines files a run writes (metrics.jsonl, admission.jsonl, the ack and buffer journals):
the one reader every command uses.

Rows are appended one line at a time by a process that can be killed mid-write, so the last
line of a file may be torn; a reader skips it (and any other line that does not parse) rather
than crash, and the writer's next row starts a new line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path


def parse_rows(lines: Iterable[str]) -> Iterator[dict]:
    """The JSON objects among `lines`; blank, torn or non-object lines are skipped."""
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            yield row


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file, skipping a torn line; [] if the file is missing."""
    path = Path(path)
    if not path.is_file():
        return []
    return list(parse_rows(path.read_text(errors="replace").splitlines()))
