"""The built-in preference data (rm.data=builtin:addition-preferences): what human raters
would give, made here, since nothing can be downloaded.

The SFT policy (model.path, the embedded default's warm-started model) samples responses to
the addition task's prompts at temperature 1; pairs of two different responses to one prompt
are shown to simulated raters who prefer by a hidden gold reward, with Bradley-Terry noise:
the response with the higher gold reward is chosen with probability
sigmoid(gold gap / rm.rater_temperature). The gold reward (asyncrl.rewards.gold_reward,
registered as the rule reward `gold`) ranks a correct and concise answer over a correct one
with text after it ("rambling"), over a wrong one. Two responses the gold reward ties (two
different wrong answers) are not shown to the raters, who would have no preference. The
proxy reward model trained on the pairs never sees the function, only the choices; its
held-out pairs come from the task's held-out problems, labelled by the gold reward itself (no
noise), so its held-out accuracy is its agreement with the gold preference.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable

from asyncrl.rewards import gold_reward
from asyncrl.rm.data import Pair


def sample_responses(policy_dir: str, prompts: list[str], k: int, max_tokens: int, seed: int,
                     progress: Callable[[str], None] = print,
                     temperature: float = 1.0, who: str = "the SFT policy") -> list[list[str]]:
    """k responses per prompt from the policy at `temperature` (transformers, CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from asyncrl.task import encode_prompt

    hf_logging.disable_progress_bar()  # progress is ours, one line per chunk
    tok = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    by_length: dict[int, list[int]] = {}
    ids = [encode_prompt(tok, p) for p in prompts]
    for i, x in enumerate(ids):
        by_length.setdefault(len(x), []).append(i)
    out: list[list[str]] = [[] for _ in prompts]
    done, t0 = 0, time.monotonic()
    for length, members in by_length.items():
        for start in range(0, len(members), 256):
            chunk = members[start:start + 256]
            with torch.inference_mode():
                seqs = model.generate(torch.tensor([ids[i] for i in chunk]), do_sample=True,
                                      temperature=temperature, top_k=0, top_p=1.0,
                                      max_new_tokens=max_tokens, num_return_sequences=k,
                                      pad_token_id=tok.pad_token_id,
                                      eos_token_id=tok.eos_token_id)
            texts = tok.batch_decode(seqs[:, length:], skip_special_tokens=True)
            for j, i in enumerate(chunk):
                out[i] = texts[j * k:(j + 1) * k]
            before, done = done, done + len(chunk)
            if done == len(prompts) or done * 10 // len(prompts) > before * 10 // len(prompts):
                took = time.monotonic() - t0
                progress(f"[train-rm] sampled {who} on {done}/{len(prompts)} prompts "
                         f"({took:.0f}s, about {took * (len(prompts) - done) / done:.0f}s left)")
    return out


def label_pairs(problems, responses: list[list[str]], n: int, temperature: float,
                rng: random.Random, strict: bool) -> list[Pair]:
    """Up to n pairs of two responses to one prompt that the gold reward does not tie, the
    chosen one picked as a rater would (Bradley-Terry on the gold gap; temperature 0 or
    strict (held-out pairs): always the better one)."""
    pairs = []
    for p, rs in zip(problems, responses, strict=True):
        for a, b in _distinct_pairs(rs, p.answer):
            gap = gold_reward(a, p.answer) - gold_reward(b, p.answer)
            if strict or temperature == 0:
                first = gap > 0
            else:
                first = rng.random() < 1 / (1 + math.exp(-max(-50, min(50, gap / temperature))))
            pairs.append(Pair(p.prompt, a, b) if first else Pair(p.prompt, b, a))
            if len(pairs) >= n:
                return pairs
    return pairs


def _distinct_pairs(responses: list[str], answer: str):
    """Disjoint pairs of responses the gold reward does not tie."""
    left = list(responses)
    while len(left) >= 2:
        a = left.pop(0)
        for j, b in enumerate(left):
            if gold_reward(a, answer) != gold_reward(b, answer):
                yield a, left.pop(j)
                break


def make_preferences(cfg, policy_dir: str, progress: Callable[[str], None] = print,
                     pairs: int = 0, tag: int = 0, who: str = "the SFT policy"
                     ) -> tuple[list[Pair], list[Pair]]:
    """(training pairs, held-out pairs) of the policy's samples on the task's training and
    held-out problems: `pairs` training pairs (0: rm.pairs). `tag` 0 is the first reward
    model's data; another tag (iterated preferences, asyncrl/rm/rounds.py) samples other
    training problems with other seeds, and other held-out samples."""
    from asyncrl.task import load_task

    if cfg.task.name != "addition":
        raise ValueError(f"rm.data={cfg.rm.data!r} is made on task.name=addition, not "
                         f"{cfg.task.name!r}; give rm.data a JSONL file for other tasks")
    train, held_out = load_task(cfg.task)
    want = pairs or cfg.rm.pairs
    rng = random.Random(f"{cfg.seed}:preferences" + (f":{tag}" if tag else ""))
    made: list[Pair] = []
    start, rounds = tag * 7919 * 64, 0  # another tag, other training problems
    while len(made) < want:  # many prompts get the same answer four times: no pair
        rounds += 1
        if rounds > 20:
            raise ValueError(f"rm.pairs={want}: the policy's samples gave only "
                             f"{len(made)} pairs of different responses in 20 rounds")
        need = max(64, 2 * (want - len(made)))  # about half the prompts give one
        prompts = [train[(start + i) % len(train)] for i in range(need)]
        start += need
        rs = sample_responses(policy_dir, [p.prompt for p in prompts], 4,
                              cfg.generator.max_tokens, cfg.seed + 1000 * rounds + 100003 * tag,
                              progress, cfg.rm.sample_temperature, who)
        made += label_pairs(prompts, rs, want - len(made), cfg.rm.rater_temperature, rng, False)
    eval_rs = sample_responses(policy_dir, [p.prompt for p in held_out], 8,
                               cfg.generator.max_tokens, cfg.seed + 1 + 100003 * tag, progress,
                               who=who)
    return made, label_pairs(held_out, eval_rs, len(held_out) * 4, 0.0, rng, True)


def win_rate(policy_dir: str, sft_dir: str, cfg, samples: int = 4,
             progress: Callable[[str], None] = print) -> dict:
    """How often the trained policy's responses beat the SFT policy's as the gold preference
    judges them: on every held-out problem, `samples` responses of each at temperature 1,
    paired in order; a win counts 1, a tie (equal gold reward) 1/2. Also the share of wins
    among decided pairs, and each side's mean gold reward."""
    from asyncrl.task import load_task

    _, held_out = load_task(cfg.task)
    prompts = [p.prompt for p in held_out]
    ours = sample_responses(policy_dir, prompts, samples, cfg.generator.max_tokens,
                            cfg.seed + 7, lambda _line: None)
    theirs = sample_responses(sft_dir, prompts, samples, cfg.generator.max_tokens,
                              cfg.seed + 7, lambda _line: None)
    wins = ties = losses = 0
    gold_ours = gold_theirs = 0.0
    for p, a_list, b_list in zip(held_out, ours, theirs, strict=True):
        for a, b in zip(a_list, b_list, strict=True):
            ga, gb = gold_reward(a, p.answer), gold_reward(b, p.answer)
            gold_ours, gold_theirs = gold_ours + ga, gold_theirs + gb
            wins, ties, losses = wins + (ga > gb), ties + (ga == gb), losses + (ga < gb)
    n = wins + ties + losses
    return {"win_rate": (wins + ties / 2) / n, "decided_win_rate": wins / max(1, wins + losses),
            "wins": wins, "ties": ties, "losses": losses, "comparisons": n,
            "gold_policy": gold_ours / n, "gold_sft": gold_theirs / n}
