"""Policy-gradient, entropy and value losses, and the one token-aggregation function.

Every loss takes the normaliser from its caller and returns (loss, metrics) with metrics as
detached Python floats. Off-policy corrections (which policy the ratio is taken against, and
the importance weights) live in offpolicy.py and call ppo_clip_loss.

Masked-out positions may hold anything (inf, NaN, padding garbage), so masks select with
torch.where, never by multiplying (inf * 0 is NaN). Selecting the output is not enough for the
gradient: the backward of exp, a square or a product at a masked position multiplies the zero
gradient by whatever the forward saw there, so the inputs of such ops are also replaced at
masked positions. Log-ratios are clamped before exp.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from collections.abc import Callable


def masked_sum_over(values: torch.Tensor, mask: torch.Tensor,
                    normaliser: float | torch.Tensor) -> torch.Tensor:
    """The one token-aggregation function: sum(values * mask / normaliser) over mask != 0.

    values, mask: (B, T). normaliser is a scalar, or (B, 1) for a per-sequence normaliser.
    Callers choose it, usually from LOSS_NORMALISERS; nothing here does. It is passed in rather
    than computed from this mask because with micro-batches and data parallelism it has to
    count the tokens of the whole optimiser step, not of one micro-batch.
    Positions where mask is 0 are selected away, so an inf or NaN there adds nothing.
    """
    return (torch.where(mask != 0, values * mask, 0.0) / normaliser).sum()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values over mask != 0, 0 when nothing is kept; for metrics. (B, T) -> scalar."""
    keep = mask != 0
    return torch.where(keep, values, 0.0).sum() / keep.sum().clamp(min=1)


def clamped_exp(log_ratio: torch.Tensor, keep: torch.Tensor, log_ratio_clamp: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """exp(clamp(log_ratio, -c, c)) at kept positions, exactly 1 elsewhere. (B, T) -> (B, T).

    Returns (ratio, the clamped log-ratio). An extreme logprob then gives a ratio of at most
    e^c with zero gradient (the clamp's) instead of inf, and a masked position never reaches
    exp, so its backward cannot form inf * 0.
    """
    if not log_ratio_clamp > 0:
        raise ValueError(f"log_ratio_clamp must be > 0, got {log_ratio_clamp}")
    log_ratio = torch.where(keep, log_ratio, 0.0).clamp(-log_ratio_clamp, log_ratio_clamp)
    return torch.exp(log_ratio), log_ratio


def token_mean_normaliser(mask: torch.Tensor, max_tokens: int | None = None) -> torch.Tensor:
    """DAPO's token-level loss: every valid token weighs the same. mask: (B, T) -> scalar."""
    return mask.sum().clamp(min=1.0)


def seq_mean_normaliser(mask: torch.Tensor, max_tokens: int | None = None) -> torch.Tensor:
    """GRPO's sample-level loss: mean over sequences of each sequence's token mean. -> (B, 1).

    Each sequence weighs the same, so tokens of long completions weigh less.
    """
    return mask.sum(dim=-1, keepdim=True).clamp(min=1.0) * mask.shape[0]  # (B, 1)


def constant_normaliser(mask: torch.Tensor, max_tokens: int | None = None) -> float:
    """Dr.GRPO: a constant B * max_tokens (the generation budget), independent of lengths."""
    if max_tokens is None or max_tokens <= 0:
        raise ValueError(f"the constant normaliser needs max_tokens > 0, got {max_tokens}")
    return float(mask.shape[0] * max_tokens)


LOSS_NORMALISERS: dict[str, Callable[[torch.Tensor, int | None], float | torch.Tensor]] = {
    "token_mean": token_mean_normaliser,
    "seq_mean": seq_mean_normaliser,
    "constant": constant_normaliser,
}


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float,
                      clip_high: float, clip_c: float | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO loss -min(ratio*A, clip(ratio, 1-clip_low, 1+clip_high)*A), (B, T).

    Separate clip_low/clip_high are DAPO's clip-higher. With clip_c (> 1), dual-clip
    (Ye et al. 2020, arXiv 1912.09729): for A < 0 the loss is also capped at -clip_c*A, so a
    token whose ratio has grown far past 1 cannot produce an unbounded loss.
    Returns (pg_losses, clipped, dual_clipped); the two bool (B, T) masks mark tokens whose
    gradient is zero because a clip is active.
    """
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    pg_losses = -torch.minimum(unclipped, clipped)
    is_clipped = (((ratio < 1.0 - clip_low) & (advantages < 0))
                  | ((ratio > 1.0 + clip_high) & (advantages > 0)))
    is_dual_clipped = torch.zeros_like(is_clipped)
    if clip_c is not None:
        if clip_c <= 1.0:
            raise ValueError(f"dual-clip needs clip_c > 1, got {clip_c}")
        cap = -clip_c * advantages
        is_dual_clipped = (advantages < 0) & (pg_losses > cap)
        pg_losses = torch.where(advantages < 0, torch.minimum(pg_losses, cap), pg_losses)
    return pg_losses, is_clipped, is_dual_clipped


def ppo_clip_loss(logprobs: torch.Tensor, behav_logprobs: torch.Tensor,
                  advantages: torch.Tensor, mask: torch.Tensor, clip_low: float,
                  clip_high: float, normaliser: float | torch.Tensor,
                  clip_c: float | None = None, weights: torch.Tensor | None = None, *,
                  log_ratio_clamp: float) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate against the behaviour policy (the generator's logprobs).

    logprobs, behav_logprobs, mask: (B, T); advantages: (B, T) or (B, 1).
    ratio = exp(clamp(logprobs - behav_logprobs, -log_ratio_clamp, log_ratio_clamp));
    pg_loss = -min(ratio*A, clip(ratio, 1-low, 1+high)*A).
    behav_logprobs is whatever policy the ratio is taken against: offpolicy.py passes the
    proximal policy there for decoupled PPO, with the detached importance weights (B, T) in
    `weights`, multiplied into each token's loss. clip_c enables dual-clip.
    Masked positions (mask 0) contribute nothing to the loss or the gradient, whatever
    logprobs, behav_logprobs, advantages or weights hold there.
    Returns (loss, metrics) with metrics as detached Python floats.
    """
    keep = mask.bool()
    mask = mask.to(logprobs.dtype)
    # The input where (in clamped_exp) stops the gradient at masked positions, and
    # masked_sum_over's where drops their values, whatever advantages or weights hold there.
    ratio, log_ratio = clamped_exp(logprobs - behav_logprobs, keep, log_ratio_clamp)
    pg_losses, is_clipped, is_dual_clipped = clipped_surrogate(
        ratio, advantages, clip_low, clip_high, clip_c)  # (B, T)
    if weights is not None:
        pg_losses = pg_losses * weights.detach()
    loss = masked_sum_over(pg_losses, mask, normaliser)
    with torch.no_grad():
        metrics = {
            "pg_loss": loss.item(),
            "clipfrac": masked_mean(is_clipped.to(mask.dtype), mask).item(),
            "dual_clipfrac": masked_mean(is_dual_clipped.to(mask.dtype), mask).item(),
            # k3 estimator of KL(behav || current), non-negative and low-variance.
            "approx_kl": masked_mean((ratio - 1) - log_ratio, mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
            "ratio_max": ratio.masked_fill(mask == 0, 0.0).max().item() if mask.any() else 1.0,
            "ratio_min": (ratio.masked_fill(mask == 0, float("inf")).min().item()
                          if mask.any() else 1.0),
        }
    return loss, metrics


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax policy, -sum_v p_v log p_v, per token. (B, T, V) -> (B, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def entropy_bonus_loss(entropy: torch.Tensor, mask: torch.Tensor,
                       normaliser: float | torch.Tensor
                       ) -> tuple[torch.Tensor, dict[str, float]]:
    """Entropy bonus as a loss term: -aggregate(H), aggregated with the same normaliser as the
    policy loss (learner.loss_agg). entropy: (B, T) per-token entropy (entropy_from_logits, or
    the learner's chunked pass); mask: (B, T).

    The caller adds coef * loss to the policy loss, so minimising it raises the entropy.
    metrics["entropy"] is the token-mean entropy whatever the normaliser.
    """
    # A non-finite entropy at a masked position must reach neither the loss nor its gradient.
    entropy = torch.where(mask.bool(), entropy, 0.0)  # (B, T)
    mask = mask.to(entropy.dtype)
    loss = -masked_sum_over(entropy, mask, normaliser)
    with torch.no_grad():
        mean = masked_mean(entropy, mask)
    return loss, {"entropy_loss": loss.item(), "entropy": mean.item()}


def explained_variance(values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor) -> float:
    """1 - Var[returns - values] / Var[returns] over valid tokens; nan when Var[returns] is 0.

    1 is a perfect critic, 0 one no better than a constant, negative one worse than that.
    values, returns, mask: (B, T).
    """
    with torch.no_grad():
        keep = mask.bool()
        v, r = values[keep].double(), returns[keep].double()
        if r.numel() < 2:
            return float("nan")
        var_r = r.var(unbiased=False)
        if var_r == 0:
            return float("nan")
        return (1.0 - (r - v).var(unbiased=False) / var_r).item()


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip_range: float | None, normaliser: float | torch.Tensor
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """Critic loss, PPO2-style value clipping: 0.5 * max((V - R)^2, (V_clip - R)^2).

    values (with grad), old_values (the critic when the data was scored), returns, mask: (B, T).
    V_clip = old_values + clip(values - old_values, -clip_range, clip_range); clip_range None
    gives the plain 0.5 * (V - R)^2. Masked positions contribute nothing, whatever they hold.
    """
    keep = mask.bool()
    mask = mask.to(values.dtype)
    values, old_values, returns = (torch.where(keep, x, 0.0)
                                   for x in (values, old_values, returns))
    unclipped = (values - returns) ** 2
    if clip_range is None:
        per_token = unclipped
        is_clipped = torch.zeros_like(unclipped, dtype=torch.bool)
    else:
        v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
        clipped = (v_clipped - returns) ** 2
        per_token = torch.maximum(unclipped, clipped)
        is_clipped = clipped > unclipped
    loss = 0.5 * masked_sum_over(per_token, mask, normaliser)
    with torch.no_grad():
        metrics = {
            "value_loss": loss.item(),
            "value_clipfrac": masked_mean(is_clipped.to(mask.dtype), mask).item(),
            "explained_variance": explained_variance(values, returns, mask),
        }
    return loss, metrics
