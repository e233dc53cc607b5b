"""Building a model directory once, atomically, for the built-in models' cache."""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path


def build_once(out: Path, build: Callable[[Path], None]) -> Path:
    """Run build(tmp) in a temporary sibling of `out`, then rename it to `out`: a killed build
    leaves no half-built model behind, and of two concurrent builds the first to finish wins
    (the other's is discarded)."""
    tmp = out.with_name(out.name + f".tmp{random.randrange(1 << 30)}")
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        if out.exists():  # another process won the race; keep theirs
            shutil.rmtree(tmp)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
