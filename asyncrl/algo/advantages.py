"""Advantage estimators.

Outcome-reward estimators take rewards (G, N), N completions for each of G prompts, and return
advantages (G, N), one per completion (the learner broadcasts it over the completion's tokens).
They share that signature so ADVANTAGE_ESTIMATORS can pick one by name. GAE needs per-token
rewards and a critic's values, so it has its own signature and is not in the dict.

A baseline's own rounding must not become a signal: the float32 mean of eight rewards of 1.7 is
one ulp off 1.7, and dividing that ulp by a std of 0 plus eps gave every completion +0.106. So
a set of rewards that are all equal gets exactly zero advantage, by selection, not arithmetic;
and the statistics are taken in float64, so that a group one ulp apart still gets advantages
of the right sign (in float32 the mean's error outweighs that spread).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from collections.abc import Callable


def _uniform(rewards: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """True where all rewards along dim (all of them, when dim is None) are equal. Keeps dims."""
    if dim is None:
        return rewards.amax() == rewards.amin()
    return rewards.amax(dim=dim, keepdim=True) == rewards.amin(dim=dim, keepdim=True)


def grpo_advantages(rewards: torch.Tensor, normalize_std: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages (DeepSeekMath, arXiv 2402.03300, eq. 3's outcome supervision).

    rewards: (G, N), N completions for each of G prompts. Returns (G, N):
    (r - mean_group(r)) / (std_group(r) + eps), or without the division (Dr.GRPO) when
    normalize_std is False. A group whose rewards are all equal gets zero advantage.
    """
    r = rewards.double()
    adv = r - r.mean(dim=1, keepdim=True)  # (G, N)
    if normalize_std:
        adv = adv / (r.std(dim=1, keepdim=True, unbiased=True) + eps)
    return torch.where(_uniform(rewards, dim=1), 0.0, adv).to(rewards.dtype)


def drgrpo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Dr.GRPO (arXiv 2503.20783): r - mean_group(r), no std division. (G, N) -> (G, N).

    The std division weights easy and hard prompts unequally; Dr.GRPO removes it, and pairs it
    with a constant loss normaliser (losses.constant_normaliser).
    """
    return grpo_advantages(rewards, normalize_std=False)


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024): r_i - mean_{j != i} r_j. (G, N) -> (G, N).

    The baseline excludes the sample itself, so it is independent of it and the estimate is
    unbiased. Needs N >= 2. Equals N/(N-1) times the Dr.GRPO advantage.
    """
    n = rewards.shape[1]
    if n < 2:
        raise ValueError(f"RLOO needs at least 2 completions per prompt, got {n}")
    r = rewards.double()
    others_mean = (r.sum(dim=1, keepdim=True) - r) / (n - 1)  # (G, N)
    return torch.where(_uniform(rewards, dim=1), 0.0, r - others_mean).to(rewards.dtype)


def reinforce_pp_advantages(rewards: torch.Tensor, group_baseline: bool = False,
                            eps: float = 1e-6) -> torch.Tensor:
    """REINFORCE++ (Hu, arXiv 2501.03262): global batch normalisation. (G, N) -> (G, N).

    Subtracts the batch mean (or, with group_baseline, each group's mean: "REINFORCE++-baseline"),
    then divides by the std of the result over the whole batch of sequences. Statistics are over
    sequences, not tokens: with outcome rewards every token of a sequence carries the same value,
    and per-token statistics would weight long completions more.
    """
    r = rewards.double()
    if group_baseline:
        centred = torch.where(_uniform(rewards, dim=1), 0.0, r - r.mean(dim=1, keepdim=True))
    else:
        centred = torch.where(_uniform(rewards), 0.0, r - r.mean())
    return (centred / (centred.std() + eps)).to(rewards.dtype)


def reinforce_pp_baseline_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE++-baseline: group mean subtracted, batch std divided. (G, N) -> (G, N)."""
    return reinforce_pp_advantages(rewards, group_baseline=True)


ADVANTAGE_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "grpo": grpo_advantages,
    "drgrpo": drgrpo_advantages,
    "rloo": rloo_advantages,
    "reinforce_pp": reinforce_pp_advantages,
    "reinforce_pp_baseline": reinforce_pp_baseline_advantages,
}


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                   gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), backward over tokens.

    rewards, values, mask: (B, T); rewards are per token (an outcome reward sits on the last
    valid token, a KL penalty on every token). delta_t = r_t + gamma*V_{t+1} - V_t and
    A_t = delta_t + gamma*lam*A_{t+1}, where t+1 is the next *valid* token: masked positions are
    skipped (the state carries across them), and after the last valid token V = 0 (terminal).
    Returns (advantages, returns), both (B, T), zero at masked positions; returns = A + V is
    the critic's regression target. Whatever rewards and values hold at masked positions
    (inf, NaN) reaches neither output.
    """
    keep = mask.bool()
    next_value = torch.zeros_like(values[:, 0])  # (B,)
    next_adv = torch.zeros_like(values[:, 0])  # (B,)
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        m = keep[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(m, adv_t, 0.0)
        next_adv = torch.where(m, adv_t, next_adv)
        next_value = torch.where(m, values[:, t], next_value)
    returns = torch.where(keep, advantages + values, 0.0)
    return advantages, returns


def terminal_token_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards with each completion's outcome reward on its last valid token.

    rewards: (B,) one per completion; mask: (B, T). Returns (B, T), zero elsewhere (a
    completion with no valid token gets none), for GAE and the per-token KL penalty.
    """
    keep = mask.bool()
    last = keep & (keep.cumsum(-1) == keep.sum(-1, keepdim=True))  # (B, T) last valid token
    return torch.where(last, rewards.reshape(-1, 1).to(torch.float32), 0.0)


def reward_to_go(token_rewards: torch.Tensor) -> torch.Tensor:
    """sum_{s >= t} r_s along the tokens (undiscounted): what a per-token penalty adds to a
    sequence-level advantage from token t on. (B, T) -> (B, T)."""
    return token_rewards.flip(-1).cumsum(-1).flip(-1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(x - mean) / (std + eps) over the valid tokens (population std), zero elsewhere: PPO's
    advantage whitening. (B, T) -> (B, T)."""
    keep = mask.bool()
    n = keep.sum().clamp(min=1)
    x = torch.where(keep, values, 0.0)
    mean = x.sum() / n
    std = (torch.where(keep, (values - mean) ** 2, 0.0).sum() / n).sqrt()
    return torch.where(keep, (values - mean) / (std + eps), 0.0)
