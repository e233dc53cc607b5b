"""The built-in agentic task: long sums with a calculator tool, over several turns.

A problem is the reasoning task's sum of k distinct terms, `17+5+33=` (asyncrl/task/
reasoning.py); it runs in the calculator environment (asyncrl/env/calculator.py), where each
model turn either calls the tool, whose memory holds the last result, `<calc>+17</calc>`,
answered `<result>17</result>`, or answers, `<answer>55</answer>`. Using the tool for every
term is always right: the model only copies numbers (the next term, the last result). Adding
in its head is where it slips.

The SFT warm start imitates an imperfect tool user (`task.tool_skip`): before each call the
teacher may instead stop using the tool and add the remaining terms in its head, forgetting
the carry with probability task.carry_slip at each sum that has one, and answer that. So the
warm-started model calls the tool part of the way and then guesses, often wrongly; RL, which
rewards only right answers, has something to improve: call the tool to the end.

A reference transcript is stored in `Problem.reference` as segments joined by SEP, starting
with a model turn and alternating with the environment's observations (`segments` splits
it); the warm start trains on the model turns only, each ended by EOS, as the episode's
turns are sampled.
"""

from __future__ import annotations

import random

from asyncrl.task.addition import Problem, slipped_sum
from asyncrl.task.reasoning import make_problems as make_sums
from asyncrl.task.reasoning import prompt_terms

TAGS = ("<calc>", "</calc>", "<result>", "</result>", "<answer>", "</answer>")
SEP = "\x1e"  # between the segments of a reference transcript


def transcript(terms: list[int], tool_skip: float, carry_slip: float,
               rng: random.Random | None) -> list[tuple[str, bool]]:
    """The teacher's episode as (text, said by the model) segments: a call per term, adding it
    to the calculator's memory; or, with probability tool_skip before a call after the first,
    the remaining terms added in its head (slipping the carry with carry_slip); then the
    answer."""
    segs: list[tuple[str, bool]] = []
    total = 0
    for i, t in enumerate(terms):
        if i > 0 and rng is not None and rng.random() < tool_skip:
            for u in terms[i:]:
                total = slipped_sum(total, u, carry_slip, rng)
            break
        segs.append((f"<calc>+{t}</calc>", True))
        total += t
        segs.append((f"<result>{total}</result>\n", False))
    segs.append((f"<answer>{total}</answer>", True))
    return segs


def segments(reference: str) -> list[tuple[str, bool]]:
    """A stored reference back into (text, said by the model) segments."""
    return [(s, i % 2 == 0) for i, s in enumerate(reference.split(SEP))]


def make_problems(digits: int, min_terms: int, max_terms: int, tail: float, train_size: int,
                  eval_size: int, seed: int, tool_skip: float = 0.0, carry_slip: float = 0.0
                  ) -> tuple[list[Problem], list[Problem]]:
    """The reasoning task's problems, each training one with its teacher transcript."""
    train, held_out = make_sums(digits, min_terms, max_terms, tail, train_size, eval_size, seed)
    teacher = random.Random(f"{seed}:tool_skip")
    out = []
    for p in train:
        segs = transcript(prompt_terms(p.prompt), tool_skip, carry_slip, teacher)
        out.append(Problem(p.id, p.prompt, p.answer, SEP.join(text for text, _ in segs)))
    return out, held_out
