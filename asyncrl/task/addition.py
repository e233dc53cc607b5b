"""The built-in verifiable task: multi-digit addition, `007+345=` -> `352`, scored by the one
`correctness` reward of asyncrl/rewards.py (a tag-free completion is its own answer).

Problems are drawn from a seeded generator; the held-out set is disjoint from the training set
by construction, so eval_accuracy measures generalisation, not memorisation.

An imperfect teacher (`task.carry_slip`): the SFT reference of a training problem whose units
digits carry can forget that carry (`57+68=` -> `115`) with probability carry_slip, drawn from
its own seeded stream, so the problems are the same whatever carry_slip is. The answers and
the held-out set stay exact. The model then writes the slip greedily on some carries and
samples the carry on others, and the exact reward teaches RL to prefer it: what RL can
improve does not hinge on which sharp model a CPU's rounding produced (docs/reliability.md).
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


def slipped_sum(a: int, b: int, carry_slip: float, rng: random.Random | None) -> int:
    """a + b, or with probability carry_slip (where the units digits carry) 10 less: the
    teacher forgot the carry."""
    if rng is not None and a % 10 + b % 10 >= 10 and rng.random() < carry_slip:
        return a + b - 10
    return a + b


def make_problems(digits: int, train_size: int, eval_size: int, seed: int,
                  carry_slip: float = 0.0) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) lists of distinct problems; eval is drawn first, train never repeats it.
    With carry_slip the training problems' references come from the slipping teacher."""
    teacher = random.Random(f"{seed}:carry_slip") if carry_slip > 0 else None
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
        training = teacher is not None and len(out) >= eval_size
        reference = str(slipped_sum(a, b, carry_slip, teacher)) if training else ""
        # Operands zero-padded to a fixed width, so each digit sits at a fixed position.
        out.append(Problem(len(out), f"{a:0{digits}d}+{b:0{digits}d}=", str(a + b), reference))
    return out[eval_size:], out[:eval_size]

