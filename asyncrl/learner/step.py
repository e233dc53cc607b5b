"""One learner step: advantages, then ppo_epochs x minibatches updates with the configured
off-policy correction, entropy bonus, KL to the reference and (for PPO) the critic.

Three policies are kept apart (decoupled PPO, AReaL arXiv 2505.24298): behaviour = the
generator's logprobs (version v, sent with the data); proximal = this learner's logprobs before
the step's first update (recomputed here, no grad); current = the model being updated.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from asyncrl import lora
from asyncrl.algo.advantages import (
    ADVANTAGE_ESTIMATORS,
    gae_advantages,
    masked_whiten,
    reward_to_go,
    terminal_token_rewards,
)
from asyncrl.algo.kl import kl_loss, kl_reward_penalty
from asyncrl.algo.losses import (
    LOSS_NORMALISERS,
    entropy_bonus_loss,
    explained_variance,
    value_loss,
)
from asyncrl.algo.offpolicy import offpolicy_pg_loss
from asyncrl.algo.sampling import overlong_filter_mask, soft_overlong_punishment
from asyncrl.config import LearnerConfig
from asyncrl.learner.batch import TrainBatch
from asyncrl.learner.model import critic_values, forward_logprobs
from asyncrl.learner.packing import Packing, pack_if_smaller
from asyncrl.learner.shard import clip_grad_norm


@dataclass
class Models:
    policy: torch.nn.Module  # possibly DDP-wrapped or FSDP-sharded (asyncrl/learner/shard.py)
    policy_opt: torch.optim.Optimizer
    ref: torch.nn.Module | None = None  # frozen copy of the starting policy, for KL
    critic: torch.nn.Module | None = None  # value model, for advantage="gae"
    critic_opt: torch.optim.Optimizer | None = None
    ref_is_base: bool = False  # model.lora: the reference is the policy, adapters off

    def reference(self):
        """(the module whose logprobs are the reference's, the context to run it in), or
        None without a KL term."""
        if self.ref_is_base:
            return self.policy, lora.adapters_off(self.policy)
        return None if self.ref is None else (self.ref, contextlib.nullcontext())


def warmup_schedule(opt: torch.optim.Optimizer, warmup_steps: int, anneal_steps: int = 0):
    """Linear learning-rate warm-up over warmup_steps, then constant; with anneal_steps, also
    a linear decay to 0 at step anneal_steps (learner.lr_anneal: cleanrl's anneal_lr)."""
    warmup = max(1, warmup_steps)

    def factor(s: int) -> float:  # s: optimizer steps taken before this one
        return min(1.0, (s + 1) / warmup) * (max(0.0, 1 - s / anneal_steps) if anneal_steps
                                             else 1.0)

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def shaped_rewards(batch: TrainBatch, lc: LearnerConfig, max_tokens: int) -> torch.Tensor:
    """Task rewards plus DAPO's soft overlong punishment when enabled. (G, N)."""
    rewards = batch.rewards
    if lc.overlong_cache > 0:
        lengths = batch.completion_mask.sum(dim=1)[:rewards.numel()]  # each episode's own row
        pen = soft_overlong_punishment(lengths, max_tokens, lc.overlong_cache)
        rewards = rewards + pen.reshape(rewards.shape).to(rewards.dtype)
    return rewards


def padding_fraction(batch: TrainBatch, packing: Packing | None) -> float:
    """Share of the model's input tokens that are padding, in the layout used for the batch."""
    computed = batch.input_ids.numel() if packing is None else packing.computed_tokens
    return 1.0 - float(batch.attention_mask.sum()) / computed


@dataclass
class StepData:
    """What every update of one step reads: the batch, its loss mask after overlong
    filtering, the proximal and reference logprobs (None when not needed), the advantages and,
    for GAE, the critic's returns and values before the step."""

    batch: TrainBatch
    mask: torch.Tensor  # (B, L-1)
    prox: torch.Tensor | None  # (B, L-1)
    ref: torch.Tensor | None  # (B, L-1)
    adv: torch.Tensor  # (B, 1) or (B, L-1)
    returns: torch.Tensor | None = None  # (B, L-1), GAE only
    old_values: torch.Tensor | None = None  # (B, L-1), GAE only


@dataclass
class Advantages:
    adv: torch.Tensor  # (B, 1) or (B, L-1)
    returns: torch.Tensor | None
    values: torch.Tensor | None
    stats: dict[str, float]


def train_step(models: Models, batch: TrainBatch, lc: LearnerConfig, temperature: float,
               max_tokens: int) -> dict[str, float]:
    mask = batch.completion_mask  # (B, L-1)
    if lc.overlong_filter:
        mask = overlong_filter_mask(mask, batch.truncated)
    rewards = shaped_rewards(batch, lc, max_tokens)  # (G, N)
    # The layout of the whole batch, decided once for every forward pass over it.
    packing = pack_if_smaller(batch.input_ids, batch.attention_mask, lc.pack_row_tokens)
    stats: dict[str, float] = {"reward_mean": float(batch.rewards.mean()),
                               "padding_fraction": padding_fraction(batch, packing)}
    # With one update per batch the proximal policy is the policy as it is now, so its
    # logprobs come from the update's own forward pass (detached) instead of a separate one;
    # unless the KL reward penalty needs them before the advantages.
    single = lc.ppo_epochs * lc.minibatches == 1 and not (lc.kl_coef > 0
                                                          and lc.kl_mode == "reward")
    with torch.no_grad():
        prox = None
        if not single:
            prox, _ = forward_logprobs(models.policy, batch.input_ids, batch.attention_mask,
                                       temperature, packing=packing,
                                       chunk_tokens=lc.logprob_chunk_tokens)  # (B, L-1)
        ref = None
        if (reference := models.reference()) is not None:
            module, context = reference
            with context:
                ref, _ = forward_logprobs(module, batch.input_ids, batch.attention_mask,
                                          temperature, packing=packing,
                                          chunk_tokens=lc.logprob_chunk_tokens)
        a = advantages(models, batch, rewards, mask, prox, ref, lc, packing)
    stats.update(a.stats)
    data = StepData(batch, mask, prox, ref, a.adv, a.returns, a.values)
    rows = torch.arange(batch.input_ids.shape[0])
    # Each minibatch packs on its own, once for all epochs and for both models.
    chunks = [(idx, packing if lc.minibatches == 1 else pack_if_smaller(
        batch.input_ids[idx], batch.attention_mask[idx], lc.pack_row_tokens))
        for idx in rows.chunk(lc.minibatches)]
    first, later = True, []
    for _ in range(lc.ppo_epochs):
        for idx, idx_packing in chunks:
            # Each minibatch is its own optimizer step, so it is normalised on its own tokens.
            normaliser = LOSS_NORMALISERS[lc.loss_agg](mask[idx], max_tokens)
            out = policy_update(models, data, idx, normaliser, lc, temperature, idx_packing)
            if first:  # report the first update: on fresh data its ratio is exactly 1
                stats.update(out)
                first = False
            else:
                later.append(out)
            if models.critic is not None:
                stats.update(critic_update(models, data, idx, lc, idx_packing))
    # The updates after the first are where the clip against the proximal policy can bind
    # (decoupled PPO, TIS); their mean, so a run shows whether it does.
    for key in ("clipfrac", "prox_vs_current") if later else ():
        stats[f"{key}_later"] = sum(o[key] for o in later) / len(later)
    return stats


def advantages(models: Models, batch: TrainBatch, rewards: torch.Tensor, mask: torch.Tensor,
               prox: torch.Tensor | None, ref: torch.Tensor | None, lc: LearnerConfig,
               packing: Packing | None) -> Advantages:
    """The configured advantage estimator, with the KL reward penalty when kl_mode=reward."""
    stats: dict[str, float] = {}
    kl_reward = ref is not None and lc.kl_mode == "reward"
    if lc.advantage != "gae":
        # (B, 1): a separate sample of an episode takes that episode's advantage
        adv = ADVANTAGE_ESTIMATORS[lc.advantage](rewards).reshape(-1, 1)[batch.row_episode]
        if kl_reward:
            # A per-token KL penalty turns the sequence advantage into a per-token one.
            pen, kl_stats = kl_reward_penalty(torch.zeros_like(prox), prox, ref, mask,
                                              lc.kl_coef, lc.kl_estimator, kl_clamp=lc.kl_clamp)
            adv = adv + reward_to_go(pen)  # (B, L-1)
            stats["kl_ref"] = kl_stats["kl"]
        return Advantages(adv, None, None, stats)
    values = critic_values(models.critic, batch.input_ids, batch.attention_mask,
                           packing)  # (B, L-1)
    token_rewards = terminal_token_rewards(rewards.reshape(-1)[batch.row_episode],
                                           mask).to(values.dtype)
    if kl_reward:
        token_rewards, kl_stats = kl_reward_penalty(token_rewards, prox, ref, mask, lc.kl_coef,
                                                    lc.kl_estimator, kl_clamp=lc.kl_clamp)
        stats["kl_ref"] = kl_stats["kl"]
    adv, returns = gae_advantages(token_rewards, values, mask, lc.gamma, lc.lam)
    stats["explained_variance"] = explained_variance(values, returns, mask)
    if lc.whiten_gae:
        adv = masked_whiten(adv, mask)
    return Advantages(adv, returns, values, stats)


def policy_update(models: Models, data: StepData, idx: torch.Tensor, normaliser,
                  lc: LearnerConfig, temperature: float,
                  packing: Packing | None) -> dict[str, float]:
    """One optimizer step of the policy on the rows idx: the off-policy PG loss, the entropy
    bonus and the KL loss, each aggregated with the same normaliser (learner.loss_agg)."""
    batch = data.batch
    logprobs, entropy = forward_logprobs(models.policy, batch.input_ids[idx],
                                         batch.attention_mask[idx], temperature,
                                         with_entropy=lc.entropy_coef != 0, packing=packing,
                                         chunk_tokens=lc.logprob_chunk_tokens)
    m = data.mask[idx]
    prox = logprobs.detach() if data.prox is None else data.prox[idx]  # see train_step
    adv = data.adv[idx] if data.adv.shape[0] > 1 else data.adv
    loss, stats = offpolicy_pg_loss(
        lc.offpolicy, logprobs, prox, batch.behav_logprobs[idx], adv, m, lc.clip_low,
        lc.clip_high, normaliser, clip_c=lc.clip_c or None, is_cap=lc.is_cap, is_low=lc.is_low,
        is_high=lc.is_high, log_ratio_clamp=lc.log_ratio_clamp)
    if entropy is not None:
        ent_loss, ent_stats = entropy_bonus_loss(entropy, m, normaliser)
        loss = loss + lc.entropy_coef * ent_loss
        stats.update(ent_stats)
    if data.ref is not None and lc.kl_mode == "loss":
        kl, kl_stats = kl_loss(logprobs, data.ref[idx], m, normaliser, lc.kl_estimator,
                               kl_clamp=lc.kl_clamp)
        loss = loss + lc.kl_coef * kl
        stats["kl_ref"] = kl_stats["kl"]
    models.policy_opt.zero_grad(set_to_none=True)
    loss.backward()
    stats["grad_norm"] = clip_grad_norm(models.policy.parameters(), lc.max_grad_norm)
    models.policy_opt.step()
    stats["loss"] = loss.item()
    return stats


def critic_update(models: Models, data: StepData, idx: torch.Tensor, lc: LearnerConfig,
                  packing: Packing | None) -> dict[str, float]:
    """One optimizer step of the critic on the rows idx (clipped value loss)."""
    values = critic_values(models.critic, data.batch.input_ids[idx],
                           data.batch.attention_mask[idx], packing)
    m = data.mask[idx]
    loss, stats = value_loss(values, data.old_values[idx], data.returns[idx], m,
                             lc.value_clip or None, m.sum().clamp(min=1))
    models.critic_opt.zero_grad(set_to_none=True)
    (lc.vf_coef * loss).backward()
    clip_grad_norm(models.critic.parameters(), lc.max_grad_norm)
    models.critic_opt.step()
    return stats
