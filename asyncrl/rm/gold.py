"""The built-in preference data (rm.data=builtin:addition-preferences): what human raters
would give, made here, since nothing can be downloaded.

The SFT policy (model.path, the embedded default's warm-started model) samples responses to
the addition task's prompts at temperature 1; pairs of two different responses to one prompt
are shown to simulated raters who prefer by a hidden gold reward, with Bradley-Terry noise:
the response with the higher gold reward is chosen with probability
sigmoid(gold gap / rm.rater_temperature). The gold reward (`gold_score`) ranks a correct and
concise answer over a correct one with text after it ("rambling"), over a near miss, over a
far miss, over no number. The proxy reward model trained on the pairs never sees the
function, only the choices; its held-out pairs come from the task's held-out problems,
labelled by the gold reward itself (no noise), so its held-out accuracy is its agreement with
the gold preference.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable

from asyncrl.rm.data import Pair

_NUMBER = re.compile(r"-?\d+")


def gold_score(answer: str, response: str) -> float:
    """The hidden gold reward of a response to an addition prompt: 1 for the exact answer,
    less 0.1 per character after it (at most 0.5); a wrong number 0.4 * exp(-|error| / 10),
    less 0.05 per character after it (at most 0.2); no number, 0."""
    text = response.strip()
    m = _NUMBER.match(text)
    if m is None:
        return 0.0
    extra = len(text) - m.end()
    if m.group() == str(answer).strip():
        return 1.0 - min(0.5, 0.1 * extra)
    error = abs(int(m.group()) - int(answer)) if len(m.group()) < 19 else 10**18
    return 0.4 * math.exp(-min(error, 1000) / 10) - min(0.2, 0.05 * extra)


def sample_responses(policy_dir: str, prompts: list[str], k: int, max_tokens: int, seed: int,
                     progress: Callable[[str], None] = print) -> list[list[str]]:
    """k responses per prompt from the policy at temperature 1 (transformers, CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asyncrl.task import encode_prompt

    tok = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir, torch_dtype=torch.float32).eval()
    torch.manual_seed(seed)
    by_length: dict[int, list[int]] = {}
    ids = [encode_prompt(tok, p) for p in prompts]
    for i, x in enumerate(ids):
        by_length.setdefault(len(x), []).append(i)
    out: list[list[str]] = [[] for _ in prompts]
    done = 0
    for length, members in by_length.items():
        for start in range(0, len(members), 256):
            chunk = members[start:start + 256]
            with torch.inference_mode():
                seqs = model.generate(torch.tensor([ids[i] for i in chunk]), do_sample=True,
                                      temperature=1.0, top_k=0, top_p=1.0,
                                      max_new_tokens=max_tokens, num_return_sequences=k,
                                      pad_token_id=tok.pad_token_id,
                                      eos_token_id=tok.eos_token_id)
            texts = tok.batch_decode(seqs[:, length:], skip_special_tokens=True)
            for j, i in enumerate(chunk):
                out[i] = texts[j * k:(j + 1) * k]
            done += len(chunk)
            progress(f"[train-rm] sampled the SFT policy on {done}/{len(prompts)} prompts")
    return out


def label_pairs(problems, responses: list[list[str]], n: int, temperature: float,
                rng: random.Random, strict: bool) -> list[Pair]:
    """Up to n pairs of two different responses to one prompt, the chosen one picked as a
    rater would (Bradley-Terry on the gold gap; temperature 0: always the better one).
    strict: only pairs the gold reward orders (held-out pairs, labelled without noise)."""
    pairs = []
    for p, rs in zip(problems, responses, strict=True):
        for a, b in _distinct_pairs(rs, p.answer, strict):
            gap = gold_score(p.answer, a) - gold_score(p.answer, b)
            if strict or temperature == 0:
                first = gap > 0 or (gap == 0 and rng.random() < 0.5)
            else:
                first = rng.random() < 1 / (1 + math.exp(-max(-50, min(50, gap / temperature))))
            pairs.append(Pair(p.prompt, a, b) if first else Pair(p.prompt, b, a))
            if len(pairs) >= n:
                return pairs
    return pairs


def _distinct_pairs(responses: list[str], answer: str, strict: bool):
    """Disjoint pairs of different responses (of different gold rewards when strict)."""
    left = list(responses)
    while len(left) >= 2:
        a = left.pop(0)
        for j, b in enumerate(left):
            if b != a and (not strict or gold_score(answer, a) != gold_score(answer, b)):
                yield a, left.pop(j)
                break


def make_preferences(cfg, policy_dir: str, progress: Callable[[str], None] = print
                     ) -> tuple[list[Pair], list[Pair]]:
    """(training pairs, held-out pairs) on the task's training and held-out problems."""
    from asyncrl.task import load_task

    if cfg.task.name != "addition":
        raise ValueError(f"rm.data={cfg.rm.data!r} is made on task.name=addition, not "
                         f"{cfg.task.name!r}; give rm.data a JSONL file for other tasks")
    train, held_out = load_task(cfg.task)
    rng = random.Random(f"{cfg.seed}:preferences")
    pairs: list[Pair] = []
    start, rounds = 0, 0
    while len(pairs) < cfg.rm.pairs:  # many prompts get the same answer four times: no pair
        rounds += 1
        if rounds > 20:
            raise ValueError(f"rm.pairs={cfg.rm.pairs}: the policy's samples gave only "
                             f"{len(pairs)} pairs of different responses in 20 rounds")
        need = max(64, 2 * (cfg.rm.pairs - len(pairs)))  # about half the prompts give one
        prompts = [train[(start + i) % len(train)] for i in range(need)]
        start += need
        rs = sample_responses(policy_dir, [p.prompt for p in prompts], 4,
                              cfg.generator.max_tokens, cfg.seed + 1000 * rounds, progress)
        pairs += label_pairs(prompts, rs, cfg.rm.pairs - len(pairs), cfg.rm.rater_temperature,
                             rng, False)
    eval_rs = sample_responses(policy_dir, [p.prompt for p in held_out], 8,
                               cfg.generator.max_tokens, cfg.seed + 1, progress)
    return pairs, label_pairs(held_out, eval_rs, len(held_out) * 4, 0.0, rng, True)
