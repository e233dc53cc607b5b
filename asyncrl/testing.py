"""Trajectory groups and a tiny random model for the tests and the benchmarks.

`make_groups` builds `TrajectoryGroup`s whose every field is either given or drawn at random
(seeded), so that a test, a fuzzer or a benchmark states only what it cares about.
`build_tiny_model` saves the built-in tiny Llama's shape with random weights and its
tokenizer. Importing this module imports numpy and asyncrl.wire only; torch and transformers
are imported when a model is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from asyncrl.wire import Completion, TrajectoryGroup

Lengths = int | tuple[int, int]  # a fixed length, or (lo, hi): drawn from lo..hi inclusive


def make_groups(num_groups: int = 2, group_size: int | Sequence[int] = 4, *,
                rng: np.random.Generator | int = 0, vocab_size: int = 259, min_token: int = 0,
                prompt_len: Lengths = 5, completion_len: Lengths = (1, 5),
                logprob_range: tuple[float, float] = (-3.0, -0.1),
                policy_version: int = 0, generator: str = "gen0", created_at: float = 0.0,
                first_prompt_id: int = 0,
                prompts: Sequence | None = None, tokens: Sequence | None = None,
                logprobs: Sequence | None = None, rewards: Sequence | None = None,
                finish_reason: str | Sequence | None = None,
                versions: Sequence | None = None) -> list[TrajectoryGroup]:
    """`num_groups` groups of `group_size` completions each (one size for all, or one per
    group), with prompt ids first_prompt_id, first_prompt_id + 1, ..., all sampled at
    `policy_version` by `generator`.

    What is not given is drawn from `rng` (a seed or a numpy Generator), group by group: each
    completion's length, tokens and reward, then each one's logprobs, then the prompt (the
    same seed gives the same groups). Token ids lie in
    [min_token, vocab_size), lengths as `prompt_len` and `completion_len` say, behaviour
    logprobs uniform in `logprob_range`, rewards 0 or 1.

    Given, per group: `prompts` (token ids); per group and completion: `tokens`, `logprobs`,
    `rewards`, `versions` (each token's policy version, or None for the group's). The
    finish reason is one string for all, one per group and completion, or None: "length" for
    a completion as long as `completion_len` allows, else "stop".
    """
    rng = np.random.default_rng(rng)
    sizes = [group_size] * num_groups if isinstance(group_size, int) else list(group_size)
    _check_shapes(num_groups, sizes, prompts=prompts, tokens=tokens, logprobs=logprobs,
                  rewards=rewards, versions=versions,
                  finish_reason=None if isinstance(finish_reason, str) else finish_reason)
    longest = completion_len if isinstance(completion_len, int) else completion_len[1]

    def draw_tokens(n: Lengths) -> np.ndarray:
        return rng.integers(min_token, vocab_size, _length(rng, n)).astype(np.int32)

    def completion(g: int, i: int) -> Completion:  # its logprobs come after the group's draws
        toks = (draw_tokens(completion_len) if tokens is None
                else np.asarray(tokens[g][i], np.int32))
        reward = float(rng.integers(0, 2) if rewards is None else rewards[g][i])
        v = None if versions is None else versions[g][i]
        return Completion(toks, None, reward, _finish(finish_reason, g, i, len(toks), longest),
                          None if v is None else np.asarray(v, np.int64))

    groups = []
    for g, size in enumerate(sizes):
        comps = [completion(g, i) for i in range(size)]
        for i, c in enumerate(comps):
            c.logprobs = np.asarray(rng.uniform(*logprob_range, len(c.tokens)) if logprobs is None
                                    else logprobs[g][i], np.float32)
        prompt = (draw_tokens(prompt_len) if prompts is None
                  else np.asarray(prompts[g], np.int32))
        groups.append(TrajectoryGroup(first_prompt_id + g, prompt, policy_version, comps,
                                      generator, created_at))
    return groups


def _length(rng: np.random.Generator, n: Lengths) -> int:
    return n if isinstance(n, int) else int(rng.integers(n[0], n[1] + 1))


def _finish(finish_reason: str | Sequence | None, g: int, i: int, length: int,
            longest: int) -> str:
    if isinstance(finish_reason, str):
        return finish_reason
    if finish_reason is None:
        return "length" if length == longest else "stop"
    return finish_reason[g][i]


def _check_shapes(num_groups: int, sizes: list[int], **given: Sequence | None) -> None:
    """One group size per group; each argument given one entry per group, and all but the
    prompts one per completion of each group."""
    if len(sizes) != num_groups:
        raise ValueError(f"group_size needs one entry per group ({num_groups})")
    for name, x in given.items():
        if x is not None and (len(x) != num_groups or (
                name != "prompts" and [len(e) for e in x] != sizes)):
            raise ValueError(f"{name} needs one entry per group ({num_groups})"
                             + ("" if name == "prompts" else
                                f", each with one per completion ({sizes})"))


def build_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    """The built-in tiny Llama's shape with random weights (`seed`, no SFT) and its tokenizer,
    saved in hub format in `out_dir`; a directory that already holds a model is reused."""
    from transformers import AutoTokenizer

    from asyncrl.task.tiny_model import build_model, build_tokenizer

    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").is_file():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out_dir)
    tok = AutoTokenizer.from_pretrained(out_dir)
    model = build_model(len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
