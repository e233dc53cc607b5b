"""DAPO's sampling and reward shaping (Yu et al., arXiv 2503.14476, sections 3.2 and 3.4).

Dynamic sampling drops prompt groups that carry no gradient; overlong filtering and soft
overlong punishment keep truncated completions from teaching the wrong thing.
"""

from __future__ import annotations

import torch


def dynamic_sampling_mask(group_rewards: torch.Tensor, atol: float = 0.0) -> torch.Tensor:
    """Groups worth training on: rewards not all equal. (G, N) -> (G,) bool.

    A group whose completions all score the same gets zero group-relative advantage, so it only
    dilutes the batch. The caller drops the other groups and keeps sampling until the batch is
    full (DAPO eq. 11: 0 < |{correct}| < G); this function only says which groups qualify.
    """
    spread = group_rewards.amax(dim=1) - group_rewards.amin(dim=1)  # (G,)
    return spread > atol


TRUNCATED = ("length", "max_turns")


def truncated_from_finish_reasons(finish_reasons: list[str]) -> torch.Tensor:
    """(B,) bool: True for completions stopped by a budget: the length limit (vLLM's
    finish_reason, or an episode's token budget) or an episode's turn limit."""
    return torch.tensor([reason in TRUNCATED for reason in finish_reasons], dtype=torch.bool)


def overlong_filter_mask(mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """Overlong filtering: loss mask with truncated completions removed. (B, T), (B,) -> (B, T).

    A truncated completion may have been on a good path; its low reward would punish it for
    length alone, so it contributes no loss at all.
    """
    return mask * (~truncated.bool()).to(mask.dtype)[:, None]


def soft_overlong_punishment(lengths: torch.Tensor, max_len: int, cache_len: int
                             ) -> torch.Tensor:
    """DAPO eq. 13, added to the task reward: lengths (B,) in tokens -> penalty (B,) float.

    0 when len <= max_len - cache_len; (max_len - cache_len - len) / cache_len, falling linearly
    from 0 to -1, when max_len - cache_len < len <= max_len; -1 when len > max_len.
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(f"need 0 < cache_len <= max_len, got cache_len={cache_len}, "
                         f"max_len={max_len}")
    lengths = lengths.to(torch.float64)
    expected = max_len - cache_len
    penalty = ((expected - lengths) / cache_len).clamp(max=0.0)
    penalty = torch.where(lengths > max_len, torch.full_like(penalty, -1.0), penalty)
    return penalty.to(torch.get_default_dtype())
