"""Rewards on completion text: rule-based functions, their weighted sum, and a learned scorer.

Every rule-based reward is `fn(completion: str, answer: str) -> float`, so REWARD_FUNCTIONS
can be composed by name (`combine({"correctness": 2.0, "xmlcount": 1.0})`) and a config can
check the names when it loads. The format rewards follow the widely copied GRPO demo
(willccbb's grpo_demo.py) for the layout

    <reasoning>
    ...
    </reasoning>
    <answer>
    ...
    </answer>

with its bugs fixed, noted where they change a value. Each function returns 1.0 for a full
match; the demo's scale (2.0 for correctness, 0.5 for the others) is GRPO_DEMO_WEIGHTS.
Plain Python: math-verify, torch and transformers are imported only by what needs them.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_INT_RE = re.compile(r"-?\d+")
# DOTALL: the demo's patterns had no flag, so any multi-line reasoning failed to match.
_STRICT_RE = re.compile(r"<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n?", re.DOTALL)
_SOFT_RE = re.compile(r"\s*<reasoning>.*?</reasoning>\s*<answer>.*?</answer>\s*", re.DOTALL)
# One step of a worked sum. 18 digits at most: int() of longer strings is slow (and refused
# past 4300 digits), and no step of a task here is that long.
_STEP_RE = re.compile(r"(-?\d{1,18})\+(-?\d{1,18})=(-?\d{1,18})")


def extract_answer(completion: str) -> str:
    """The text between the last <answer> and the next </answer>, stripped.

    Without an <answer> tag it is the whole completion, stripped, so tag-free tasks such as the
    built-in addition task work unchanged; an unclosed tag takes everything after it.
    """
    return completion.split("<answer>")[-1].split("</answer>")[0].strip()


def correctness_reward(completion: str, answer: str) -> float:
    """1.0 when the extracted answer equals the reference answer exactly, else 0.0."""
    return 1.0 if extract_answer(completion) == answer.strip() else 0.0


def int_reward(completion: str, answer: str = "") -> float:
    """1.0 when the extracted answer is an integer (optionally negative; the demo's isdigit()
    refused a minus sign), else 0.0."""
    return 1.0 if _INT_RE.fullmatch(extract_answer(completion)) else 0.0


def strict_format_reward(completion: str, answer: str = "") -> float:
    """1.0 for exactly the layout above: each tag on its own line, nothing before or after
    (one trailing newline allowed; the demo required it, but generators usually strip it)."""
    return 1.0 if _STRICT_RE.fullmatch(completion) else 0.0


def soft_format_reward(completion: str, answer: str = "") -> float:
    """1.0 for <reasoning>...</reasoning> then <answer>...</answer>, any whitespace around and
    between the blocks, nothing else outside them."""
    return 1.0 if _SOFT_RE.fullmatch(completion) else 0.0


def xmlcount_reward(completion: str, answer: str = "") -> float:
    """0.125 for each of the four tags present exactly once in its own-line form, minus 0.001
    per character after "\\n</answer>" (one trailing newline is free). Maximum 0.5.

    The demo subtracted the trailing-text penalty twice, the first time split on
    "\\n</answer>\\n", which charged the whole completion when it ended right after the tag.
    """
    count = 0.0
    for tag in ("<reasoning>\n", "\n</reasoning>\n", "\n<answer>\n", "\n</answer>"):
        if completion.count(tag) == 1:
            count += 0.125
    if completion.count("\n</answer>") == 1:
        trailing = completion.split("\n</answer>")[-1]
        count -= max(len(trailing) - 1, 0) * 0.001
    return count


def scratchpad_reward(completion: str, answer: str = "") -> float:
    """The share of the lines inside <reasoning>...</reasoning> that are a right step of a sum
    worked line by line (the reasoning task's scratchpad, asyncrl/task/reasoning.py): `a+b=c`
    with c = a + b, and a the previous line's c (the first line's a is free). 0.0 without a
    reasoning block or lines.

    A process reward: it scores each step's arithmetic, so completions that all miss the final
    answer still differ in how many steps they got right. It cannot see whether b is the
    prompt's next term (a reward sees only the completion and the answer); correctness does.
    """
    if "<reasoning>" not in completion:
        return 0.0
    body = completion.split("<reasoning>", 1)[1].split("</reasoning>", 1)[0]
    lines = [line.strip() for line in body.split("\n") if line.strip()]
    good, previous = 0, None
    for line in lines:
        m = _STEP_RE.fullmatch(line)
        if m is None:
            previous = None
            continue
        a, b, c = (int(x) for x in m.groups())
        good += c == a + b and (previous is None or a == previous)
        previous = c
    return good / len(lines) if lines else 0.0


def math_verify_reward(completion: str, answer: str) -> float:
    """1.0 when math-verify finds the extracted answer mathematically equal to the reference
    (1/2 == 0.5 == \\frac{1}{2}), else 0.0. Needs `pip install math-verify`."""
    try:
        from math_verify import parse, verify
    except ImportError as e:
        raise ImportError("the 'math_verify' reward needs the math-verify package: "
                          "pip install 'math-verify>=0.9'") from e
    # math-verify's timeouts use SIGALRM, which only the main thread may set.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(answer, parsing_timeout=timeout) or parse(f"${answer}$", parsing_timeout=timeout)
    pred = parse(extract_answer(completion), parsing_timeout=timeout)
    if not gold or not pred:
        return 0.0
    return 1.0 if verify(gold, pred, timeout_seconds=timeout) else 0.0


def gold_reward(completion: str, answer: str) -> float:
    """The hidden gold preference of the built-in preference data (asyncrl/rm/gold.py) on the
    addition task: 1 for the exact answer, less 0.1 per character after it (at most 0.5);
    a wrong number or none, 0, less 0.05 per character after it (at most 0.2). A correct and
    concise answer beats a correct one with text after it ("rambling"), which beats a wrong
    one. Logged with weight 0 in configs/rlhf.yaml, it is the gold the reward model (the
    proxy) is measured against."""
    text = completion.strip()
    m = _GOLD_NUMBER.match(text)
    extra = len(text) - (m.end() if m else 0)
    if m is not None and m.group() == str(answer).strip():
        return 1.0 - min(0.5, 0.1 * extra)
    return -min(0.2, 0.05 * extra)


_GOLD_NUMBER = re.compile(r"-?\d+")

REWARD_FUNCTIONS: dict[str, Callable[[str, str], float]] = {
    "correctness": correctness_reward,
    "int": int_reward,
    "strict_format": strict_format_reward,
    "soft_format": soft_format_reward,
    "xmlcount": xmlcount_reward,
    "scratchpad": scratchpad_reward,
    "math_verify": math_verify_reward,
    "gold": gold_reward,
}

GRPO_DEMO_WEIGHTS: dict[str, float] = {
    "correctness": 2.0, "int": 0.5, "strict_format": 0.5, "soft_format": 0.5, "xmlcount": 1.0,
}


@dataclass(frozen=True)
class CompositeReward:
    """Weighted sum of REWARD_FUNCTIONS entries; build it with combine()."""

    weights: dict[str, float]

    def __post_init__(self) -> None:
        unknown = sorted(set(self.weights) - set(REWARD_FUNCTIONS))
        if unknown:
            raise ValueError(f"unknown reward function(s) {unknown}; "
                             f"valid names are {sorted(REWARD_FUNCTIONS)}")

    def components(self, completion: str, answer: str) -> dict[str, float]:
        """Each named reward, unweighted, for logging alongside the total."""
        return {name: REWARD_FUNCTIONS[name](completion, answer) for name in self.weights}

    def __call__(self, completion: str, answer: str) -> float:
        parts = self.components(completion, answer)
        return sum(self.weights[name] * value for name, value in parts.items())


def combine(weights: dict[str, float]) -> CompositeReward:
    """A CompositeReward summing weights[name] * REWARD_FUNCTIONS[name](completion, answer)."""
    return CompositeReward(dict(weights))


class RewardModelScorer:
    """Scores (prompt, completion) pairs with a local AutoModelForSequenceClassification
    checkpoint with one label (a Bradley-Terry reward model): the score is that logit.

    The pair is rendered with the tokenizer's chat template (user, assistant) when it has one,
    otherwise as prompt + completion. The checkpoint's config must set pad_token_id, which the
    model uses to find the last real token of each padded row.
    """

    def __init__(self, model_dir: str | Path, device: str = "cpu", batch_size: int = 8,
                 max_length: int | None = None) -> None:
        path = Path(model_dir).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"reward model directory {path} has no config.json; expected "
                                    "a local transformers sequence-classification checkpoint")
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward model {path} has num_labels="
                             f"{self.model.config.num_labels}; a reward model has 1")
        if self.model.config.pad_token_id is None or self.tokenizer.pad_token_id is None:
            raise ValueError(f"reward model {path} needs pad_token_id in its config and a pad "
                             "token in its tokenizer to score padded batches")
        self.device, self.batch_size, self.max_length = device, batch_size, max_length

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        """One float per (prompt, completion) pair, in order."""
        import torch

        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        from asyncrl.rm import encode, render

        texts = [render(self.tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            enc = encode(self.tokenizer, texts[start:start + self.batch_size],
                         return_tensors="pt", padding=True,
                         truncation=self.max_length is not None,
                         max_length=self.max_length).to(self.device)
            with torch.inference_mode():
                logits = self.model(**enc).logits  # (b, 1)
            scores.extend(logits[:, 0].float().tolist())
        return scores
