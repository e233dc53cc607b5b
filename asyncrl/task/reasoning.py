"""The built-in long-tail reasoning task: multi-step addition with a worked scratchpad.

A prompt is a sum of k terms, `17+5+33+8=`; the reference completion adds them left to right,
one line per partial sum, in the `<reasoning>...</reasoning><answer>...</answer>` layout that
the format rewards of asyncrl/rewards.py check (each tag on its own line, as strict_format
requires):

    <reasoning>
    17+5=22
    22+33=55
    55+8=63
    </reasoning>
    <answer>
    63
    </answer>

The number of terms k is drawn from a power law on [min_terms, max_terms],
P(k) ~ (k - min_terms + 1)^-terms_tail, so most problems are short and a few are long: with the
builtin:tiny-reasoning tokenizer (the four tags are single tokens) a completion is about 12 +
10 (k - 1) tokens, and the lengths have the long tail of the workloads streaming generation is
for (tests/unit/test_task_reasoning.py checks p50 >= 30 and p90 >= 4 x p10). Each line is one
more chance to slip, so accuracy falls with k, and RL has something to improve on every length.

Why not Countdown (TinyZero): its solver traces are a search whose length depends on the
solver's order rather than on the problem, many traces are right for one problem, and a 3.5M
model would have to learn search from a few minutes of SFT on 2 cores. Here the trace is
determined by the problem, its length is set exactly by k (so the length distribution is a
config choice, not an accident of the solver), and the answer is checked exactly.

An imperfect teacher (`task.carry_slip`): the SFT traces of the training problems can come
from a solver that forgets the carry out of the units digit, at each step where there is one,
with probability carry_slip, and goes on from its wrong partial sum (its answer is then wrong).
The rewards and the held-out answers stay exact. Why: RL improves what the policy already
samples. A model distilled from an exact solver either has a step or has not, and after a
cosine-decayed SFT it is so sharp that RL's steps overshoot (docs/performance.md section 9,
"the gradient checked": its expected reward falls along its own policy gradient within 0.01
in weight norm). A model distilled from a solver that slips 70% of the time writes the slip greedily
and can still sample the carry (its teacher wrote it 3 times in 10): the exact reward tells
the two apart, and RL can do better than its teacher, which is what RL after SFT is for
(configs/reasoning.yaml: greedy carries right 30 -> 254 of ~550 in 80 RL steps).

The terms of a problem are distinct numbers of exactly `task.digits` digits: the next term to
add is then the one after the last one written, found by its text (what a small transformer's
induction heads do), not by counting positions. Problems are drawn from a seeded generator,
held-out first; a training problem never repeats a held-out one (the same terms in the same
order), so eval_accuracy measures generalisation.
"""

from __future__ import annotations

import random

from asyncrl.task.addition import Problem, slipped_sum

TAGS = ("<reasoning>", "</reasoning>", "<answer>", "</answer>")


def term_weights(min_terms: int, max_terms: int, tail: float) -> list[float]:
    """P(k) for k = min_terms..max_terms, proportional to (k - min_terms + 1)^-tail."""
    raw = [(k - min_terms + 1) ** -tail for k in range(min_terms, max_terms + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def solution(terms: list[int], carry_slip: float = 0.0, rng: random.Random | None = None
             ) -> str:
    """The reference completion: one line per partial sum, then the total as the answer.
    With carry_slip and an rng, the imperfect teacher's (module docstring): each line goes on
    from the previous line's (possibly wrong) result."""
    lines, total = [], terms[0]
    for t in terms[1:]:
        s = slipped_sum(total, t, carry_slip, rng)
        lines.append(f"{total}+{t}={s}")
        total = s
    steps = "\n".join(lines)
    return f"<reasoning>\n{steps}\n</reasoning>\n<answer>\n{total}\n</answer>"


def prompt_terms(prompt: str) -> list[int]:
    """The terms of a prompt `a+b+...=`."""
    return [int(t) for t in prompt.rstrip("=").split("+")]


def make_problems(digits: int, min_terms: int, max_terms: int, tail: float, train_size: int,
                  eval_size: int, seed: int, carry_slip: float = 0.0
                  ) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) lists of distinct problems; eval is drawn first, train never repeats it.
    The terms of a problem are distinct numbers of exactly `digits` digits. The training
    problems' references (what SFT imitates) slip with carry_slip; answers are always exact,
    and the problems drawn do not depend on carry_slip."""
    rng = random.Random(seed)
    # Its own stream, so that the problems are the same whatever carry_slip is.
    teacher = random.Random(f"{seed}:carry_slip") if carry_slip > 0 else None
    ks = list(range(min_terms, max_terms + 1))
    weights = term_weights(min_terms, max_terms, tail)
    values = range(10 ** (digits - 1), 10**digits)
    seen: set[tuple[int, ...]] = set()
    out: list[Problem] = []
    need = train_size + eval_size
    redraws = 0
    while len(out) < need:
        k = rng.choices(ks, weights)[0]
        terms = tuple(rng.sample(values, k))
        while terms in seen:  # redraw the terms, not k, so k keeps its distribution
            redraws += 1
            if redraws > 100 * need:  # the short problems ran out: the space is too small
                raise ValueError(
                    f"task.train_size + task.eval_size = {need}: too many distinct problems "
                    f"for task.digits={digits}, task.min_terms={min_terms}; raise task.digits "
                    "or task.min_terms, or lower the sizes")
            terms = tuple(rng.sample(values, k))
        seen.add(terms)
        held_out = len(out) < eval_size
        out.append(Problem(len(out), "+".join(map(str, terms)) + "=", str(sum(terms)),
                           solution(list(terms), carry_slip, None if held_out else teacher)))
    return out[eval_size:], out[:eval_size]
