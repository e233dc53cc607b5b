"""Policy-gradient losses."""

from __future__ import annotations

import torch


def masked_sum_over(values: torch.Tensor, mask: torch.Tensor, normaliser: float) -> torch.Tensor:
    """The one token-aggregation function: sum(values * mask) / normaliser.

    Token-mean passes mask.sum() as the normaliser (DAPO's token-level loss); a fixed
    constant gives Dr.GRPO's aggregation. Callers choose the normaliser; nothing here does.
    """
    return (values * mask).sum() / normaliser


def ppo_clip_loss(logprobs: torch.Tensor, behav_logprobs: torch.Tensor,
                  advantages: torch.Tensor, mask: torch.Tensor, clip_low: float,
                  clip_high: float, normaliser: float) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate against the behaviour policy (the generator's logprobs).

    logprobs, behav_logprobs, mask: (B, T); advantages: (B, T) or (B, 1).
    ratio = exp(logprobs - behav_logprobs); pg_loss = -min(ratio*A, clip(ratio, 1-low, 1+high)*A).
    Returns (loss, metrics) with metrics as detached Python floats.
    """
    mask = mask.to(logprobs.dtype)
    log_ratio = logprobs - behav_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    pg_losses = -torch.minimum(unclipped, clipped)  # (B, T)
    loss = masked_sum_over(pg_losses, mask, normaliser)
    with torch.no_grad():
        n = mask.sum().clamp(min=1.0)
        clipfrac = (((ratio < 1.0 - clip_low) & (advantages < 0))
                    | ((ratio > 1.0 + clip_high) & (advantages > 0))).to(mask.dtype)
        metrics = {
            "pg_loss": loss.item(),
            "clipfrac": ((clipfrac * mask).sum() / n).item(),
            # k3 estimator of KL(behav || current), non-negative and low-variance.
            "approx_kl": (((ratio - 1) - log_ratio) * mask).sum().div(n).item(),
            "ratio_mean": ((ratio * mask).sum() / n).item(),
            "ratio_max": ratio.masked_fill(mask == 0, 0.0).max().item() if mask.any() else 1.0,
        }
    return loss, metrics
