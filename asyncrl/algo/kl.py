"""KL divergence from the current policy to a frozen reference, estimated on sampled tokens.

With p the current policy, q the reference and r = q/p = exp(ref_logprobs - logprobs) at a token
sampled from p (Schulman, "Approximating KL Divergence", 2020), each estimating KL(p || q):

- k1 = -log r = log p/q: unbiased, high variance, negative on some tokens.
- k2 = 0.5 * (log r)^2: biased, low variance, >= 0.
- k3 = (r - 1) - log r: unbiased, low variance, >= 0 (GRPO's KL term, DeepSeekMath eq. 4).

Use: a per-token reward penalty (kl_reward_penalty, usually k1; detached, so only the return
sees it) or a loss term (kl_loss). As a loss the estimators differ in their gradient, not only
their value: on-policy, grad k2 = (log p/q) grad log p is the score-function gradient of
KL(p || q), while grad k3 = (1 - q/p) grad log p follows KL(q || p) in expectation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from asyncrl.algo.losses import masked_sum_over

if TYPE_CHECKING:
    from collections.abc import Callable


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """log p/q per token. (B, T), (B, T) -> (B, T)."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """0.5 * (log q/p)^2 per token. (B, T), (B, T) -> (B, T)."""
    return 0.5 * (ref_logprobs - logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """(r - 1) - log r with r = q/p, per token. (B, T), (B, T) -> (B, T)."""
    log_r = ref_logprobs - logprobs
    return torch.expm1(log_r) - log_r


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


def _estimator(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {name!r}; choose one of {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[name]


def kl_reward_penalty(token_rewards: torch.Tensor, logprobs: torch.Tensor,
                      ref_logprobs: torch.Tensor, mask: torch.Tensor, beta: float,
                      estimator: str = "k1") -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token rewards minus beta * KL estimate, for GAE or REINFORCE-style returns.

    token_rewards, logprobs, ref_logprobs, mask: (B, T). Returns ((B, T) detached rewards, zero
    at masked positions; metrics with the token-mean "kl").
    """
    mask = mask.to(logprobs.dtype)
    with torch.no_grad():
        kl = _estimator(estimator)(logprobs, ref_logprobs)  # (B, T)
        shaped = (token_rewards - beta * kl) * mask
        mean_kl = (kl * mask).sum() / mask.sum().clamp(min=1.0)
    return shaped, {"kl": mean_kl.item()}


def kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
            normaliser: float | torch.Tensor, estimator: str = "k3"
            ) -> tuple[torch.Tensor, dict[str, float]]:
    """KL to the reference as a loss term, aggregated with masked_sum_over; the caller adds
    beta * loss. logprobs (with grad), ref_logprobs, mask: (B, T)."""
    mask = mask.to(logprobs.dtype)
    kl = _estimator(estimator)(logprobs, ref_logprobs.detach())  # (B, T)
    loss = masked_sum_over(kl, mask, normaliser)
    with torch.no_grad():
        mean_kl = (kl * mask).sum() / mask.sum().clamp(min=1.0)
    return loss, {"kl_loss": loss.item(), "kl": mean_kl.item()}
