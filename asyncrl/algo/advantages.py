"""Advantage estimators."""

from __future__ import annotations

import torch


def grpo_advantages(rewards: torch.Tensor, normalize_std: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages (DeepSeekMath, arXiv 2402.03300, eq. 3's outcome supervision).

    rewards: (G, N), N completions for each of G prompts. Returns (G, N):
    (r - mean_group(r)) / (std_group(r) + eps), or without the division (Dr.GRPO) when
    normalize_std is False. A group whose rewards are all equal gets zero advantage.
    """
    mean = rewards.mean(dim=1, keepdim=True)  # (G, 1)
    adv = rewards - mean
    if normalize_std:
        adv = adv / (rewards.std(dim=1, keepdim=True, unbiased=True) + eps)
    return adv
