"""Sequence packing for the learner's forward passes.

A batch is collated right-padded, one sequence per row (batch.py), and every loss works on that
(B, L-1) layout. Padding every row to the longest sequence wastes compute: 19% of the tokens in
the default run and 40-50% once completions are longer than prompts (docs/performance.md, section
6). So the model itself runs on a packed layout: sequences are placed first-fit-decreasing into
rows of `row_tokens`, with position ids restarting at 0 for each sequence and no attention mask
(when that computes at least 10% fewer tokens: `pack_if_smaller`).
transformers then builds a block-diagonal causal mask from where the position ids restart (and
FlashAttention-2 on GPU uses them directly), so no token sees another sequence. The per-token
outputs are put back into the padded layout, and nothing after the forward pass changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Packing:
    input_ids: torch.Tensor  # (R, W) sequences laid end to end, the row's tail filled with 0
    position_ids: torch.Tensor  # (R, W) 0, 1, ... within each sequence (and the tail)
    # One entry per position that predicts a next token (position t of a sequence of length
    # n, t < n - 1): where it sits in the padded (B, L-1) layout and in the packed one.
    seq: torch.Tensor  # (N,)
    pos: torch.Tensor  # (N,)
    row: torch.Tensor  # (N,)
    col: torch.Tensor  # (N,)
    padded_shape: tuple[int, int]  # (B, L-1)

    @property
    def computed_tokens(self) -> int:
        return self.input_ids.numel()

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """(N,) per-position values -> (B, L-1) padded layout, 0 where nothing is predicted.
        Differentiable in `values`."""
        out = values.new_zeros(self.padded_shape)
        return out.index_put((self.seq, self.pos), values)


def sequence_lengths(attention_mask: torch.Tensor) -> list[int]:
    """Lengths of right-padded rows; a mask with a hole in it is an error, not a guess."""
    lengths = attention_mask.sum(dim=1)
    ranks = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    if not torch.equal(attention_mask.bool(), ranks < lengths.unsqueeze(1)):
        raise ValueError("packing needs right-padded rows (attention mask 1...1 0...0)")
    return lengths.tolist()


def _place(lengths: list[int], row_tokens: int
           ) -> tuple[int, dict[int, tuple[int, int]], list[int]]:
    """(row width, sequence -> (row, offset), room left per row), first-fit decreasing."""
    width = max(max(lengths), row_tokens)
    free: list[int] = []
    place: dict[int, tuple[int, int]] = {}
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, room in enumerate(free) if room >= lengths[i]), len(free))
        if row == len(free):
            free.append(width)
        place[i] = (row, width - free[row])
        free[row] -= lengths[i]
    return width, place, free


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, row_tokens: int,
         lengths: list[int] | None = None) -> Packing:
    """Place each row's sequence into rows of max(row_tokens, longest sequence) tokens,
    longest first, each into the first row with room (first-fit decreasing)."""
    lengths = sequence_lengths(attention_mask) if lengths is None else lengths
    width, place, free = _place(lengths, row_tokens)
    ids = torch.zeros((len(free), width), dtype=input_ids.dtype, device=input_ids.device)
    positions = torch.zeros_like(ids)
    seq, pos, row, col = [], [], [], []
    for i, (r, start) in place.items():
        n = lengths[i]
        ids[r, start : start + n] = input_ids[i, :n]
        positions[r, start : start + n] = torch.arange(n, device=ids.device)
        seq.append(torch.full((n - 1,), i))
        pos.append(torch.arange(n - 1))
        row.append(torch.full((n - 1,), r))
        col.append(torch.arange(start, start + n - 1))
    for r, room in enumerate(free):  # the tail counts as one more sequence
        positions[r, width - room :] = torch.arange(room, device=ids.device)
    device = input_ids.device
    return Packing(ids, positions, *(torch.cat(x).to(device) for x in (seq, pos, row, col)),
                   (input_ids.shape[0], input_ids.shape[1] - 1))


def pack_if_smaller(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    row_tokens: int) -> Packing | None:
    """The packed layout when it computes at least 10% fewer tokens than one padded row per
    sequence, else None: use the padded one (also with row_tokens <= 0, packing off).

    Sequences of nearly equal length pad little and pack worse: in the default run,
    completions of 3-4 tokens give rows of 10-11 tokens, 4% padding, while 5 of them fill only
    55 of 64 packed tokens; and a packed row's attention spans the whole row. Decided from the
    lengths alone, once per batch (or minibatch); callers pass the result to every forward pass
    over those rows."""
    if row_tokens <= 0:
        return None
    lengths = sequence_lengths(attention_mask)
    width, _, free = _place(lengths, row_tokens)
    if width * len(free) > 0.9 * input_ids.numel():
        return None
    return pack(input_ids, attention_mask, row_tokens, lengths)


def packed_logits(model, p: Packing) -> torch.Tensor:
    """The model's output at every predicting position, (N, ...) in Packing order."""
    # No attention mask and no KV cache: only then does transformers derive the mask from the
    # position ids (masking_utils.find_packed_sequence_indices).
    out = model(input_ids=p.input_ids, position_ids=p.position_ids, use_cache=False).logits
    return out[p.row, p.col]
