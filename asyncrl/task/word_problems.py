"""Synthetic grade-school word problems with integer answers, for a small real instruct model.

    Mia has 14 marbles. She buys 9 more. How many marbles does Mia have now?   -> 23
    Omar had 37 stickers. He gave 12 to a friend and then bought 5. How many stickers does
    Omar have now?                                                             -> 30

A problem is one of a few templates (add, take away, groups of, share equally, and two-step
add-then-take-away / take-away-then-add) filled with a name, an object and numbers of at most
`task.digits` digits (multipliers and divisors stay in 2..9, so a product is mental
arithmetic; a product or a shared total may reach 81 at one digit). Every answer is a
non-negative integer. The prompt is the question alone: the answer layout the format rewards
of asyncrl/rewards.py check is asked for by the config's chat turns (task.system_prompt, as in
the GRPO demo, and task.chat_examples, two worked examples; configs/smollm2.yaml).

Why this and not GSM8K-style problems or bare arithmetic: a 135M model solves almost no
GSM8K-style multi-step problems, so its correctness rewards would be all zero and GRPO would
have little signal; with bare `a+b=` prompts its chat tuning and the format tags are idle.
One- and two-step problems with small numbers are what it partly does, and they are written
in words, so following the tagged layout is a real instruction-following skill to learn on
top of the arithmetic. Measured with configs/smollm2.yaml's chat turns (task.digits=1,
temperature 0.7, 16 samples): correctness 0.50, strict_format 0.44, xmlcount 0.31 of 0.5;
with the layout only described in the user turn and one inline example: strict_format 0.0,
correctness 0.0 over 32 samples at 2 digits. Both have room to rise.

Held-out split: problems are drawn from a seeded generator, held-out first; a training
problem never repeats a held-out one (the same template, name, object and numbers), so
eval_accuracy measures generalisation to unseen problems, not recall.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from asyncrl.task.addition import Problem

NAMES = [("Mia", "She"), ("Omar", "He"), ("Lena", "She"), ("Ravi", "He"), ("Sara", "She"),
         ("Tom", "He"), ("Ana", "She"), ("Ken", "He"), ("Zoe", "She"), ("Luis", "He")]
THINGS = ["marbles", "stickers", "apples", "pencils", "cards", "coins", "books", "shells"]


def _add(rng, hi, name, pron, thing):
    a, b = rng.randint(1, hi), rng.randint(1, hi)
    return (f"{name} has {a} {thing}. {pron} buys {b} more. "
            f"How many {thing} does {name} have now?", a + b)


def _take(rng, hi, name, pron, thing):
    a = rng.randint(2, hi)
    b = rng.randint(1, a - 1)
    return (f"{name} had {a} {thing}. {pron} gave {b} to a friend. "
            f"How many {thing} does {name} have left?", a - b)


def _groups(rng, hi, name, pron, thing):
    a, b = rng.randint(2, 9), rng.randint(1, max(9, hi // 9))
    return (f"{name} has {a} bags with {b} {thing} in each bag. "
            f"How many {thing} does {name} have in all?", a * b)


def _share(rng, hi, name, pron, thing):
    k, each = rng.randint(2, 9), rng.randint(1, max(9, hi // 9))
    return (f"{name} shares {k * each} {thing} equally among {k} friends. "
            f"How many {thing} does each friend get?", each)


def _add_take(rng, hi, name, pron, thing):
    a, b = rng.randint(1, hi), rng.randint(1, hi)
    c = rng.randint(1, min(hi, a + b - 1))
    return (f"{name} has {a} {thing}. {pron} buys {b} more and then gives {c} away. "
            f"How many {thing} does {name} have now?", a + b - c)


def _take_add(rng, hi, name, pron, thing):
    a = rng.randint(2, hi)
    b, c = rng.randint(1, a - 1), rng.randint(1, hi)
    return (f"{name} had {a} {thing}. {pron} gave {b} to a friend and then bought {c}. "
            f"How many {thing} does {name} have now?", a - b + c)


TEMPLATES: dict[str, Callable] = {"add": _add, "take": _take, "groups": _groups,
                                  "share": _share, "add_take": _add_take,
                                  "take_add": _take_add}


def make_problems(digits: int, train_size: int, eval_size: int, seed: int
                  ) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) lists of distinct problems; eval is drawn first, train never repeats it.
    Numbers have at most `digits` digits; every answer is a non-negative integer."""
    if digits < 1 or digits > 6:
        raise ValueError(f"task.digits={digits}: word problems take 1 to 6 digits")
    hi = 10**digits - 1
    rng = random.Random(seed)
    kinds = list(TEMPLATES)
    seen: set[str] = set()
    out: list[Problem] = []
    need = train_size + eval_size
    draws = 0
    while len(out) < need:
        draws += 1
        if draws > 50 * need:
            raise ValueError(f"task.train_size + task.eval_size = {need}: too many distinct "
                             f"word problems for task.digits={digits}; raise task.digits or "
                             "lower the sizes")
        name, pron = rng.choice(NAMES)
        question, answer = TEMPLATES[rng.choice(kinds)](rng, hi, name, pron, rng.choice(THINGS))
        if question in seen:
            continue
        seen.add(question)
        out.append(Problem(len(out), question, str(answer)))
    return out[eval_size:], out[:eval_size]
