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


class Tail:
    """The rows appended to a JSON-lines file since the last `new_rows()`, for a reader that
    follows a file another process writes (the launcher's progress lines, the trackers). A
    torn last line waits for its end. A file replaced or cut shorter (a restarted learner
    rewrites metrics.jsonl from its checkpoint) is read again from its start: `reset` says so,
    and the reader decides what a row it has seen before means."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = 0
        self.inode: int | None = None
        self.reset = False  # the last new_rows() started the file over

    def new_rows(self) -> list[dict]:
        self.reset = False
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return []
        if st.st_ino != self.inode or st.st_size < self.offset:
            self.reset = self.inode is not None
            self.inode, self.offset = st.st_ino, 0
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        return list(parse_rows(complete.decode(errors="replace").splitlines()))
