"""The built-in verifiable task: multi-digit addition, `007+345=` -> `352`, scored by the one
`correctness` reward of asyncrl/rewards.py (a tag-free completion is its own answer).

Problems are drawn from a seeded generator; the held-out set is disjoint from the training set
by construction, so eval_accuracy measures generalisation, not memorisation.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    id: int
    prompt: str
    answer: str
    reference: str = ""
    """The completion the SFT warm start trains on; empty: the answer itself."""


def make_problems(digits: int, train_size: int, eval_size: int, seed: int
                  ) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) lists of distinct problems; eval is drawn first, train never repeats it."""
    hi = 10**digits - 1
    space = (hi + 1) ** 2
    if train_size + eval_size > space:
        raise ValueError(f"task.digits={digits} has only {space} problems, "
                         f"fewer than train_size+eval_size={train_size + eval_size}")
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    out: list[Problem] = []
    while len(out) < train_size + eval_size:
        a, b = rng.randint(0, hi), rng.randint(0, hi)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        # Operands zero-padded to a fixed width, so each digit sits at a fixed position.
        out.append(Problem(len(out), f"{a:0{digits}d}+{b:0{digits}d}=", str(a + b)))
    return out[eval_size:], out[:eval_size]

