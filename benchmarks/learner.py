"""Learner training throughput and padding waste, with a packed prototype (issue 7, item 6).

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

Packed prototype (here only, asyncrl/ is unchanged): the same sequences placed first-fit
decreasing into rows of max(padded width, --pack-width) tokens (short sequences only pack
when rows are wider than the longest one), position ids restarting at each sequence and no
attention mask, so transformers builds a block-diagonal causal mask from the position ids and
no sequence attends to another; then the same forward, `offpolicy_pg_loss`,
backward, clip and AdamW step. The printed max |logprob diff| checks that packed and padded
forwards agree on every completion token.

Run from the repository root (about 70 s on 2 cores):
    .venv/bin/python -m benchmarks.learner
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

GROUP_SIZE = 8


@dataclass
class Case:
    name: str
    groups: int
    max_tokens: int
    prompt_min: int
    prompt_max: int


CASES = [  # fewer groups for long sequences: one step must stay under ~10 s on one core
    Case("default run: prompt 7, completion 1..6", 16, 6, 7, 7),
    Case("prompt 7, completion 1..32", 16, 32, 7, 7),
    Case("prompt 7, completion 1..128", 4, 128, 7, 7),
    Case("prompt 16..128, completion 1..128", 4, 128, 16, 128),
]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--reps", type=int, default=2, help="timed steps per case and layout")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pack-width", type=int, default=128,
                   help="minimum row width of the packed layout")
    p.add_argument("--work-dir", default="~/.cache/asyncrl/bench")
    return p


def make_groups(case: Case, vocab: int, rng) -> list:
    import numpy as np

    from asyncrl import wire

    groups = []
    for g in range(case.groups):
        prompt = rng.integers(3, vocab, int(rng.integers(case.prompt_min, case.prompt_max + 1)),
                              dtype=np.int32)
        comps = []
        for _ in range(GROUP_SIZE):
            n = int(rng.integers(1, case.max_tokens + 1))
            comps.append(wire.Completion(
                rng.integers(3, vocab, n, dtype=np.int32),
                np.log(rng.uniform(0.05, 1.0, n)).astype(np.float32), float(rng.integers(0, 2)),
                "length" if n == case.max_tokens else "stop"))
        groups.append(wire.TrajectoryGroup(g, prompt, 0, comps, "gen0", 0.0))
    return groups


# ------------------------------------------------------------------ packed prototype


@dataclass
class PackedBatch:
    input_ids: object  # (R, W)
    position_ids: object  # (R, W), restarting at 0 for every sequence
    completion_mask: object  # (R, W-1)
    behav_logprobs: object  # (R, W-1)
    advantages: object  # (R, W-1), each sequence's advantage on its tokens
    where: list  # per sequence: (row, first completion-predicting position, T)


def pack(groups: list, pad_id: int, width: int) -> PackedBatch:
    """First-fit decreasing into rows of `width` tokens."""
    import torch

    from asyncrl.algo.advantages import ADVANTAGE_ESTIMATORS

    seqs = [(g, c) for g in groups for c in g.completions]
    adv = ADVANTAGE_ESTIMATORS["grpo"](
        torch.tensor([[c.reward for c in g.completions] for g in groups])).reshape(-1)  # (B,)
    order = sorted(range(len(seqs)), key=lambda i: -(len(seqs[i][0].prompt_tokens)
                                                     + len(seqs[i][1].tokens)))
    fill: list[int] = []
    place = [(0, 0)] * len(seqs)
    for i in order:
        n = len(seqs[i][0].prompt_tokens) + len(seqs[i][1].tokens)
        row = next((r for r, used in enumerate(fill) if used + n <= width), None)
        if row is None:
            fill.append(0)
            row = len(fill) - 1
        place[i] = (row, fill[row])
        fill[row] += n
    R = len(fill)
    ids = torch.full((R, width), pad_id, dtype=torch.long)
    pos = torch.zeros((R, width), dtype=torch.long)
    mask = torch.zeros((R, width - 1))
    behav = torch.zeros((R, width - 1))
    adv_tok = torch.zeros((R, width - 1))
    where = []
    for i, (g, c) in enumerate(seqs):
        row, off = place[i]
        P, T = len(g.prompt_tokens), len(c.tokens)
        ids[row, off:off + P] = torch.from_numpy(g.prompt_tokens.astype("int64"))
        ids[row, off + P:off + P + T] = torch.from_numpy(c.tokens.astype("int64"))
        pos[row, off:off + P + T] = torch.arange(P + T)
        s = off + P - 1  # position predicting the first completion token
        mask[row, s:s + T] = 1
        behav[row, s:s + T] = torch.from_numpy(c.logprobs)
        adv_tok[row, s:s + T] = adv[i]
        where.append((row, s, T))
    for row, used in enumerate(fill):  # the tail is a dummy sequence of its own
        pos[row, used:] = torch.arange(width - used)
    return PackedBatch(ids, pos, mask, behav, adv_tok, where)


def packed_logprobs(model, b: PackedBatch, temperature: float):
    import torch

    # No attention mask and no cache: transformers then derives the block-diagonal causal mask
    # from where the position ids restart (masking_utils.find_packed_sequence_indices).
    logits = model(input_ids=b.input_ids, position_ids=b.position_ids,
                   use_cache=False).logits[:, :-1]
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return torch.gather(logp, 2, b.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (R, W-1)


def packed_step(model, opt, b: PackedBatch, lc, temperature: float) -> None:
    """train_step's work for the default config, on the packed layout."""
    import torch

    from asyncrl.algo.losses import LOSS_NORMALISERS
    from asyncrl.algo.offpolicy import offpolicy_pg_loss

    logprobs = packed_logprobs(model, b, temperature)
    prox = logprobs.detach()  # one update per batch: proximal = current (as train_step does)
    normaliser = LOSS_NORMALISERS[lc.loss_agg](b.completion_mask, None)
    loss, _ = offpolicy_pg_loss(lc.offpolicy, logprobs, prox, b.behav_logprobs, b.advantages,
                                b.completion_mask, lc.clip_low, lc.clip_high, normaliser)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), lc.max_grad_norm)
    opt.step()


def max_logprob_diff(model, groups: list, pad_id: int, min_width: int) -> float:
    import torch

    from asyncrl.learner.batch import collate
    from asyncrl.learner.model import forward_logprobs

    batch = collate(groups, pad_id)
    b = pack(groups, pad_id, max(min_width, batch.input_ids.shape[1]))
    with torch.no_grad():
        padded, _ = forward_logprobs(model, batch.input_ids, batch.attention_mask, 1.0)
        packed = packed_logprobs(model, b, 1.0)
    worst = 0.0
    for i, (row, s, T) in enumerate(b.where):
        ref = padded[i][batch.completion_mask[i].bool()]
        worst = max(worst, float((packed[row, s:s + T] - ref).abs().max()))
    return worst


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    import numpy as np
    import torch

    from asyncrl.config import LearnerConfig
    from asyncrl.learner.batch import collate
    from asyncrl.learner.model import load_policy
    from asyncrl.learner.step import Models, train_step
    from benchmarks.common import build_tiny_model, machine, median, table

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# learner step throughput and padding, tiny model  ({machine()})")
    path = build_tiny_model(Path(args.work_dir).expanduser() / "tiny-random")
    model, tok = load_policy(path, "float32")
    model.train()
    lc = LearnerConfig()
    opt = torch.optim.AdamW(model.parameters(), lr=lc.lr, weight_decay=lc.weight_decay)
    models = Models(model, opt)
    vocab, pad = model.config.vocab_size, tok.pad_token_id
    rng = np.random.default_rng(0)
    warm = make_groups(CASES[0], vocab, rng)  # first steps allocate AdamW state
    train_step(models, collate(warm, pad), lc, temperature=1.0, max_tokens=CASES[0].max_tokens)
    packed_step(model, opt, pack(warm, pad, collate(warm, pad).input_ids.shape[1]), lc, 1.0)
    rows, diffs = [], []
    for case in CASES:
        batches = [make_groups(case, vocab, rng) for _ in range(args.reps)]
        padded_s, packed_s, shapes = [], [], []
        for groups in batches:
            batch = collate(groups, pad)
            width = batch.input_ids.shape[1]
            b = pack(groups, pad, max(width, args.pack_width))
            t0 = time.perf_counter()
            train_step(models, batch, lc, temperature=1.0, max_tokens=case.max_tokens)
            t1 = time.perf_counter()
            packed_step(model, opt, b, lc, temperature=1.0)
            t2 = time.perf_counter()
            padded_s.append(t1 - t0)
            packed_s.append(t2 - t1)
            real = int(batch.attention_mask.sum())
            shapes.append((batch.input_ids.numel(), b.input_ids.numel(), real,
                           batch.num_completion_tokens, b.input_ids.shape[0], width,
                           b.input_ids.shape[1]))
        computed, computed_packed, real, trained, packed_rows, width, packed_width = (
            median([s[k] for s in shapes]) for k in range(7))
        pad_s, pack_s = median(padded_s), median(packed_s)
        rows.append([case.name, f"{case.groups * GROUP_SIZE} x {width:.0f}", f"{computed:,.0f}",
                     f"{real:,.0f}", f"{trained:,.0f}", f"{1 - real / computed:.0%}",
                     f"{pad_s:.3f}", f"{trained / pad_s:,.0f}",
                     f"{packed_rows:.0f} x {packed_width:.0f}", f"{1 - real / computed_packed:.0%}",
                     f"{pack_s:.3f}", f"{trained / pack_s:,.0f}", f"{pad_s / pack_s:.2f}"])
        diffs.append(max_logprob_diff(model, batches[0], pad, args.pack_width))
    print(f"threads {torch.get_num_threads()}, groups of {GROUP_SIZE} completions, medians of "
          f"{args.reps} steps per case and layout (each on a new random batch); tokens per step")
    print(table(["case", "padded rows x width", "computed tok", "real tok", "trained tok",
                 "padding", "step s", "trained tok/s", "packed rows x width", "padding",
                 "step s", "trained tok/s", "speed-up"], rows))
    print(f"packed vs padded forward, max |logprob diff| on completion tokens per case: "
          f"{', '.join(f'{d:.1e}' for d in diffs)}")


if __name__ == "__main__":
    main()
