"""Learner training throughput and padding waste, padded and packed (docs/performance.md section 6).

One learner step exactly as `asyncrl.learner.main` runs it: `asyncrl.learner.batch.collate`
right-pads every sequence (prompt + completion) to the longest in the batch, then
`asyncrl.learner.step.train_step` does a forward with grad (its detached logprobs are the
proximal ones, as there is one update per batch), the PPO loss, backward, gradient clipping
and an AdamW step (config defaults: GRPO, no off-policy correction, token-mean loss, one
epoch, one minibatch). Model: the embedded
default's tiny Llama with random weights, float32, eager attention (as `load_policy` loads it),
--threads CPU threads. Batch: 16 groups x 8 completions (learner.groups_per_step x
generator.group_size) for short completions, 4 x 8 for long ones (a step of 16 x 8 x ~260
tokens takes ~1 min on one core here); lengths uniform in the ranges listed per case.

Reported per case: tokens the model computes (rows x padded width), of which real (prompt and
completion) and trained (completion) tokens, the padding fraction 1 - real/computed, the step
time, and trained tokens/s (the learner's own `tokens_per_s`).

Packed: the same `train_step` with `learner.pack_row_tokens` = --pack-width, which packs only
when that computes at least 10% fewer tokens (else the "packed" columns show the padded
layout it kept) (`asyncrl.learner.packing`: sequences placed first-fit decreasing into rows of
max(--pack-width, longest sequence) tokens, position ids restarting at each sequence and no
attention mask, so transformers builds a block-diagonal causal mask and no sequence attends
to another). Both layouts train the same batch from the same weights and optimizer state. The
printed max |logprob diff| (`asyncrl.learner.model.check_packing`) checks that packed and
padded forwards agree on every completion token.

Run from the repository root (about 70 s on 2 cores):
    .venv/bin/python -m benchmarks.learner [--json PATH]

`--json` writes every case's figures, and under `ratios` the speed-up of each,
`padded_over_packed_step_s_<case number>`.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import common

GROUP_SIZE = 8


@dataclass
class Case:
    name: str
    groups: int
    max_tokens: int
    prompt_min: int
    prompt_max: int
    completion_min: int = 1


CASES = [  # fewer groups for long sequences: one step must stay under ~10 s on one core
    Case("default run: prompt 7, completion 3..4", 16, 4, 7, 7, 3),
    Case("prompt 7, completion 1..6", 16, 6, 7, 7),
    Case("prompt 7, completion 1..32", 16, 32, 7, 7),
    Case("prompt 7, completion 1..128", 4, 128, 7, 7),
    Case("prompt 16..128, completion 1..128", 4, 128, 16, 128),
]


def _parser() -> argparse.ArgumentParser:
    p = common.doc_parser(__doc__)
    p.add_argument("--reps", type=int, default=2, help="timed steps per case and layout")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pack-width", type=int, default=64,
                   help="learner.pack_row_tokens of the packed layout")
    p.add_argument("--work-dir", default="~/.cache/asyncrl/bench")
    common.add_json_argument(p)
    return p


def make_groups(case: Case, vocab: int, rng) -> list:
    """The case's groups; a completion as long as max_tokens finished by length."""
    from asyncrl import testing

    return testing.make_groups(case.groups, GROUP_SIZE, rng=rng, vocab_size=vocab, min_token=3,
                               prompt_len=(case.prompt_min, case.prompt_max),
                               completion_len=(case.completion_min, case.max_tokens))


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    import copy

    import numpy as np
    import torch

    from asyncrl.config import LearnerConfig
    from asyncrl.learner.batch import collate
    from asyncrl.learner.model import check_packing, load_policy
    from asyncrl.learner.packing import pack_if_smaller
    from asyncrl.learner.step import Models, train_step
    from asyncrl.testing import build_tiny_model
    from benchmarks.common import machine, median, table

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# learner step throughput and padding, tiny model  ({machine()})")
    path = build_tiny_model(Path(args.work_dir).expanduser() / "tiny-random")
    model, tok = load_policy(path, "float32")
    model.train()
    padded_lc = LearnerConfig(pack_row_tokens=0)
    packed_lc = LearnerConfig(pack_row_tokens=args.pack_width)
    opt = torch.optim.AdamW(model.parameters(), lr=padded_lc.lr,
                            weight_decay=padded_lc.weight_decay)
    models = Models(model, opt)
    vocab, pad = model.config.vocab_size, tok.pad_token_id
    rng = np.random.default_rng(0)
    warm = collate(make_groups(CASES[0], vocab, rng), pad)  # first steps allocate AdamW state
    for lc in (padded_lc, packed_lc):
        train_step(models, warm, lc, temperature=1.0, max_tokens=CASES[0].max_tokens)
    rows, diffs, figures, ratios = [], [], {}, {}
    for number, case in enumerate(CASES, 1):
        batches = [collate(make_groups(case, vocab, rng), pad) for _ in range(args.reps)]
        padded_s, packed_s, shapes = [], [], []
        for batch in batches:
            # Both layouts start from the same weights and optimizer state.
            state = copy.deepcopy((model.state_dict(), opt.state_dict()))
            t0 = time.perf_counter()
            train_step(models, batch, padded_lc, temperature=1.0, max_tokens=case.max_tokens)
            t1 = time.perf_counter()
            model.load_state_dict(state[0])
            opt.load_state_dict(state[1])
            t2 = time.perf_counter()
            train_step(models, batch, packed_lc, temperature=1.0, max_tokens=case.max_tokens)
            t3 = time.perf_counter()
            padded_s.append(t1 - t0)
            packed_s.append(t3 - t2)
            chosen = pack_if_smaller(batch.input_ids, batch.attention_mask, args.pack_width)
            packed = batch.input_ids if chosen is None else chosen.input_ids  # as train_step
            shapes.append((batch.input_ids.numel(), packed.numel(),
                           int(batch.attention_mask.sum()), batch.num_completion_tokens,
                           packed.shape[0], batch.input_ids.shape[1], packed.shape[1]))
        computed, computed_packed, real, trained, packed_rows, width, packed_width = (
            median([s[k] for s in shapes]) for k in range(7))
        pad_s, pack_s = median(padded_s), median(packed_s)
        rows.append([case.name, f"{case.groups * GROUP_SIZE} x {width:.0f}", f"{computed:,.0f}",
                     f"{real:,.0f}", f"{trained:,.0f}", f"{1 - real / computed:.0%}",
                     f"{pad_s:.3f}", f"{trained / pad_s:,.0f}",
                     f"{packed_rows:.0f} x {packed_width:.0f}", f"{1 - real / computed_packed:.0%}",
                     f"{pack_s:.3f}", f"{trained / pack_s:,.0f}", f"{pad_s / pack_s:.2f}"])
        b = batches[0]
        diffs.append(check_packing(model, b.input_ids, b.attention_mask, b.completion_mask,
                                   args.pack_width))
        figures[case.name] = {"computed_tokens": computed, "computed_tokens_packed":
                              computed_packed, "real_tokens": real, "trained_tokens": trained,
                              "padded_step_s": pad_s, "packed_step_s": pack_s,
                              "max_logprob_diff": diffs[-1]}
        ratios[f"padded_over_packed_step_s_{number}"] = pad_s / pack_s
    print(f"threads {torch.get_num_threads()}, groups of {GROUP_SIZE} completions, medians of "
          f"{args.reps} steps per case and layout (each on a new random batch); tokens per step")
    print(table(["case", "padded rows x width", "computed tok", "real tok", "trained tok",
                 "padding", "step s", "trained tok/s", "packed rows x width", "padding",
                 "step s", "trained tok/s", "speed-up"], rows))
    print(f"packed vs padded forward, max |logprob diff| on completion tokens per case: "
          f"{', '.join(f'{d:.1e}' for d in diffs)}")
    common.write_json(args.json, figures, ratios)


if __name__ == "__main__":
    main()
