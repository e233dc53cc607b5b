"""Off-policy corrections for asynchronous training: three policies, kept apart.

- behav_logprobs (B, T): the behaviour policy, the generator that sampled the tokens at policy
  version v, possibly several versions stale and computed by another engine (vLLM kernels).
- prox_logprobs (B, T): the proximal policy, the learner's weights at the start of this update,
  recomputed on the batch before the first optimiser step; always detached.
- logprobs (B, T): the current policy, with grad.

log(current/behav) = log(current/prox) + log(prox/behav). The second term is the cause this
module corrects (staleness plus engine mismatch); the first is the learner's own progress within
the step, which the PPO clip bounds. Every correction here returns the same metrics, so runs
with different corrections can be compared column by column.

A dropped token is dropped with torch.where, never by a zero factor: its weight may be huge or
inf (a behaviour logprob of -101 against a proximal -1 overflows float32), and inf * 0 is NaN.
Log-ratios are also clamped to +-log_ratio_clamp before exp, so weights are at most
e^log_ratio_clamp (finite in float32 up to a clamp of 88; past that only the where keeps a
dropped token's inf out).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from asyncrl.algo.losses import clamped_exp, masked_mean, ppo_clip_loss

if TYPE_CHECKING:
    from collections.abc import Callable


class Correction(NamedTuple):
    anchor: torch.Tensor  # (B, T) logprobs the PPO ratio and clip are taken against
    weights: torch.Tensor | None  # (B, T) detached weights on each token's loss, None for 1
    keep: torch.Tensor  # (B, T) bool, valid tokens the correction keeps
    truncated: torch.Tensor  # (B, T) bool, tokens whose weight was capped


def _behav_weights(prox_logprobs: torch.Tensor, behav_logprobs: torch.Tensor,
                   mask: torch.Tensor, log_ratio_clamp: float) -> torch.Tensor:
    """prox/behav at valid tokens, log-ratio clamped; 1 at masked positions. (B, T)."""
    return clamped_exp(prox_logprobs - behav_logprobs, mask.bool(), log_ratio_clamp)[0]


def _require(name: str, **params: float | None) -> None:
    missing = [k for k, v in params.items() if v is None]
    if missing:
        raise ValueError(f"off-policy correction {name!r} needs {', '.join(missing)}")


def no_correction(prox_logprobs: torch.Tensor, behav_logprobs: torch.Tensor,
                  mask: torch.Tensor, is_cap: float | None, is_low: float | None,
                  is_high: float | None, log_ratio_clamp: float) -> Correction:
    """Plain PPO: ratio and clip against the behaviour policy; the proximal policy is unused."""
    return Correction(behav_logprobs, None, mask.bool(), torch.zeros_like(mask, dtype=torch.bool))


def decoupled_correction(prox_logprobs: torch.Tensor, behav_logprobs: torch.Tensor,
                         mask: torch.Tensor, is_cap: float | None, is_low: float | None,
                         is_high: float | None, log_ratio_clamp: float) -> Correction:
    """Decoupled PPO (AReaL, arXiv 2505.24298, eq. 5): w = prox/behav times the clipped
    surrogate whose ratio is current/prox. With is_cap, tokens with w > is_cap are dropped
    (AReaL's behav_imp_weight_cap masks them rather than clamping their weight)."""
    w = _behav_weights(prox_logprobs, behav_logprobs, mask, log_ratio_clamp)
    keep = mask.bool()
    if is_cap is not None:
        keep = keep & (w <= is_cap)
    return Correction(prox_logprobs, torch.where(keep, w, 0.0), keep, torch.zeros_like(keep))


def tis_correction(prox_logprobs: torch.Tensor, behav_logprobs: torch.Tensor,
                   mask: torch.Tensor, is_cap: float | None, is_low: float | None,
                   is_high: float | None, log_ratio_clamp: float) -> Correction:
    """Truncated importance sampling (Yao et al. 2025, "off-policy RL in disguise"): token weight
    min(prox/behav, is_cap) on the PPO clip against prox. Bias for bounded variance."""
    _require("tis", is_cap=is_cap)
    w = _behav_weights(prox_logprobs, behav_logprobs, mask, log_ratio_clamp)
    truncated = mask.bool() & (w > is_cap)
    return Correction(prox_logprobs, w.clamp(max=is_cap), mask.bool(), truncated)


def icepop_correction(prox_logprobs: torch.Tensor, behav_logprobs: torch.Tensor,
                      mask: torch.Tensor, is_cap: float | None, is_low: float | None,
                      is_high: float | None, log_ratio_clamp: float) -> Correction:
    """Masked importance sampling, IcePop (Ring-1T, arXiv 2510.18855): weight prox/behav where it
    lies in [is_low, is_high]; tokens outside are masked out (no gradient at all)."""
    _require("icepop", is_low=is_low, is_high=is_high)
    w = _behav_weights(prox_logprobs, behav_logprobs, mask, log_ratio_clamp)
    keep = mask.bool() & (w >= is_low) & (w <= is_high)
    return Correction(prox_logprobs, torch.where(keep, w, 0.0), keep, torch.zeros_like(keep))


def seq_mask_correction(prox_logprobs: torch.Tensor, behav_logprobs: torch.Tensor,
                        mask: torch.Tensor, is_cap: float | None, is_low: float | None,
                        is_high: float | None, log_ratio_clamp: float) -> Correction:
    """Sequence-level rejection: the geometric-mean ratio exp(mean_t(prox - behav)) over a
    sequence's valid tokens outside [is_low, is_high] masks the whole sequence. Kept sequences
    get no importance weight (rejection only); the clip is against prox. The clamp applies to
    the sequence's mean log-ratio, not per token, so one extreme token is not diluted by the
    others into an accepted mean."""
    _require("seq_mask", is_low=is_low, is_high=is_high)
    valid = mask.bool()
    log_w = torch.where(valid, prox_logprobs - behav_logprobs, 0.0)  # (B, T)
    seq_log_ratio = log_w.sum(-1) / valid.sum(-1).clamp(min=1)  # (B,)
    seq_ratio = clamped_exp(seq_log_ratio, valid.any(-1), log_ratio_clamp)[0]  # (B,)
    in_range = (seq_ratio >= is_low) & (seq_ratio <= is_high)  # (B,)
    keep = mask.bool() & in_range[:, None]
    return Correction(prox_logprobs, None, keep, torch.zeros_like(keep))


OFFPOLICY_CORRECTIONS: dict[str, Callable[..., Correction]] = {
    "none": no_correction,
    "decoupled": decoupled_correction,
    "tis": tis_correction,
    "icepop": icepop_correction,
    "seq_mask": seq_mask_correction,
}


def importance_ess(weights: torch.Tensor, mask: torch.Tensor) -> float:
    """Normalised effective sample size (sum w)^2 / (n * sum w^2) over valid tokens, in (0, 1].

    1 when all weights are equal (on-policy data); near 1/n when one token dominates.
    """
    with torch.no_grad():
        w = weights[mask.bool()].double()
        if w.numel() == 0 or (w * w).sum() == 0:
            return 1.0
        return (w.sum() ** 2 / (w.numel() * (w * w).sum())).item()


def _k3(log_w: torch.Tensor, log_ratio_clamp: float) -> torch.Tensor:
    """(w - 1) - log w per token, w = exp(log_w) with log_w clamped as everywhere here."""
    log_w = log_w.clamp(-log_ratio_clamp, log_ratio_clamp)
    return torch.expm1(log_w) - log_w


def offpolicy_pg_loss(name: str, logprobs: torch.Tensor, prox_logprobs: torch.Tensor,
                      behav_logprobs: torch.Tensor, advantages: torch.Tensor,
                      mask: torch.Tensor, clip_low: float, clip_high: float,
                      normaliser: float | torch.Tensor, clip_c: float | None = None,
                      is_cap: float | None = None, is_low: float | None = None,
                      is_high: float | None = None, *, log_ratio_clamp: float
                      ) -> tuple[torch.Tensor, dict[str, float]]:
    """Policy loss with the off-policy correction OFFPOLICY_CORRECTIONS[name].

    logprobs, prox_logprobs, behav_logprobs, mask: (B, T); advantages: (B, T) or (B, 1).
    is_cap: weight cap for "tis" (clamp) and "decoupled" (drop above; optional).
    is_low, is_high: accepted ratio range for "icepop" (per token) and "seq_mask" (per sequence).
    The normaliser is the caller's and is not reduced for dropped tokens, so dropping a token
    removes its gradient without scaling up the others. log_ratio_clamp bounds every log-ratio
    before exp (the weights w and the PPO ratio); tokens the correction drops or the mask
    excludes change neither the loss nor the gradient, whatever their logprobs hold.

    Metrics, besides ppo_clip_loss's (clipfrac, approx_kl, ratio_* against the anchor, over kept
    tokens), all over valid tokens and with w = prox/behav before any cap or mask:
    is_weight_mean, is_weight_max, is_ess (importance_ess of w), is_truncated_frac,
    is_masked_frac, and the two causes of the log-ratio as mean absolute log-ratios:
    behav_vs_prox = mean|prox - behav| (staleness and engine mismatch), its maximum
    behav_vs_prox_max, behav_prox_k3 = mean of k3 = (w - 1) - log w (the estimate of
    KL(behaviour || proximal) from the behaviour's own samples), and
    prox_vs_current = mean|logprobs - prox| (the learner's progress within this step).
    """
    if name not in OFFPOLICY_CORRECTIONS:
        raise ValueError(f"unknown off-policy correction {name!r}; "
                         f"choose one of {sorted(OFFPOLICY_CORRECTIONS)}")
    prox_logprobs, behav_logprobs = prox_logprobs.detach(), behav_logprobs.detach()
    corr = OFFPOLICY_CORRECTIONS[name](prox_logprobs, behav_logprobs, mask, is_cap, is_low,
                                       is_high, log_ratio_clamp)
    loss, metrics = ppo_clip_loss(logprobs, corr.anchor, advantages, corr.keep, clip_low,
                                  clip_high, normaliser, clip_c=clip_c, weights=corr.weights,
                                  log_ratio_clamp=log_ratio_clamp)
    with torch.no_grad():
        valid = mask.bool()
        w = _behav_weights(prox_logprobs, behav_logprobs, mask, log_ratio_clamp)

        def mean(x: torch.Tensor) -> float:
            return masked_mean(x.to(logprobs.dtype), valid).item()

        metrics.update({
            "is_weight_mean": mean(w),
            "is_weight_max": w.masked_fill(~valid, 0.0).max().item() if valid.any() else 1.0,
            "is_ess": importance_ess(w, valid),
            "is_truncated_frac": mean(corr.truncated),
            "is_masked_frac": mean(valid & ~corr.keep),
            "behav_vs_prox": mean((prox_logprobs - behav_logprobs).abs()),
            "behav_vs_prox_max": ((prox_logprobs - behav_logprobs).abs().masked_fill(~valid, 0.0)
                                  .max().item() if valid.any() else 0.0),
            "behav_prox_k3": mean(_k3(prox_logprobs - behav_logprobs, log_ratio_clamp)),
            "prox_vs_current": mean((logprobs.detach() - prox_logprobs).abs()),
        })
    return loss, metrics
