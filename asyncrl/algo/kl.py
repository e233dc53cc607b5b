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

Every estimator takes a bound c (learner.kl_clamp) and returns min(estimate, c) (k1, which can
be negative, is also bounded below by -c): k3 is exponential in the log-ratio (4.9e8 at 20),
and one token whose reference logprob has collapsed would otherwise dominate the step. A token
at the bound has zero gradient. Masked positions are replaced before the estimator runs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from asyncrl.algo.losses import masked_mean, masked_sum_over

if TYPE_CHECKING:
    from collections.abc import Callable


def _check_clamp(clamp: float) -> None:
    if not 0 < clamp < math.inf:
        raise ValueError(f"the KL clamp must be finite and > 0, got {clamp}")


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, clamp: float) -> torch.Tensor:
    """log p/q per token, clamped to [-clamp, clamp]. (B, T), (B, T) -> (B, T)."""
    _check_clamp(clamp)
    return (logprobs - ref_logprobs).clamp(-clamp, clamp)


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, clamp: float) -> torch.Tensor:
    """min(0.5 * (log q/p)^2, clamp) per token. (B, T), (B, T) -> (B, T).

    The log-ratio is clamped to +-sqrt(2 clamp) before squaring, which is that minimum (up to
    the rounding the last clamp removes) and keeps an infinite log-ratio from reaching the
    square's backward (2 * inf * 0).
    """
    _check_clamp(clamp)
    bound = math.sqrt(2.0 * clamp)
    return (0.5 * (ref_logprobs - logprobs).clamp(-bound, bound) ** 2).clamp(max=clamp)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, clamp: float) -> torch.Tensor:
    """min((r - 1) - log r, clamp) with r = q/p, per token. (B, T), (B, T) -> (B, T).

    log r is first clamped to [-(clamp + 1), log(2 clamp + 2)], where k3 >= clamp already at
    both ends (k3(x) >= -x - 1 and e^x - 1 - x >= clamp at e^x = 2 clamp + 2), so the result is
    exactly min(k3, clamp), and exp never overflows.
    """
    _check_clamp(clamp)
    log_r = (ref_logprobs - logprobs).clamp(-(clamp + 1.0), math.log(2.0 * clamp + 2.0))
    return (torch.expm1(log_r) - log_r).clamp(max=clamp)


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


def _estimator(name: str) -> Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]:
    if name not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {name!r}; choose one of {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[name]


def _masked_kl(name: str, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
               keep: torch.Tensor, kl_clamp: float) -> torch.Tensor:
    """The estimator at kept positions, 0 elsewhere (where the policies are made equal, so
    nothing there reaches the estimator or its backward). (B, T)."""
    fn = _estimator(name)
    return fn(torch.where(keep, logprobs, 0.0), torch.where(keep, ref_logprobs, 0.0), kl_clamp)


def kl_reward_penalty(token_rewards: torch.Tensor, logprobs: torch.Tensor,
                      ref_logprobs: torch.Tensor, mask: torch.Tensor, beta: float,
                      estimator: str = "k1", *, kl_clamp: float
                      ) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token rewards minus beta * KL estimate, for GAE or REINFORCE-style returns.

    token_rewards, logprobs, ref_logprobs, mask: (B, T); each token's estimate is clamped to
    kl_clamp. Returns ((B, T) detached rewards, zero at masked positions; metrics with the
    token-mean "kl").
    """
    keep = mask.bool()
    with torch.no_grad():
        kl = _masked_kl(estimator, logprobs, ref_logprobs, keep, kl_clamp)  # (B, T)
        shaped = torch.where(keep, token_rewards - beta * kl, 0.0)
        mean_kl = masked_mean(kl, keep)
    return shaped, {"kl": mean_kl.item()}


def kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
            normaliser: float | torch.Tensor, estimator: str = "k3", *, kl_clamp: float
            ) -> tuple[torch.Tensor, dict[str, float]]:
    """KL to the reference as a loss term, aggregated with masked_sum_over; the caller adds
    beta * loss. logprobs (with grad), ref_logprobs, mask: (B, T); each token's estimate is
    clamped to kl_clamp."""
    keep = mask.bool()
    mask = mask.to(logprobs.dtype)
    kl = _masked_kl(estimator, logprobs, ref_logprobs.detach(), keep, kl_clamp)  # (B, T)
    loss = masked_sum_over(kl, mask, normaliser)
    with torch.no_grad():
        mean_kl = masked_mean(kl, keep)
    return loss, {"kl_loss": loss.item(), "kl": mean_kl.item()}
