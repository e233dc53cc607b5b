"""Turn trajectory groups into padded training tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from asyncrl.algo.sampling import truncated_from_finish_reasons
from asyncrl.wire import TrajectoryGroup


@dataclass
class TrainBatch:
    input_ids: torch.Tensor  # (B, L) prompt + completion, right-padded
    attention_mask: torch.Tensor  # (B, L)
    # (B, L-1) 1 where position t predicts a completion token the policy sampled (tokens an
    # environment injected are part of the input, never of the loss, KL, entropy or counts)
    completion_mask: torch.Tensor
    behav_logprobs: torch.Tensor  # (B, L-1) generator logprobs, aligned with completion_mask
    rewards: torch.Tensor  # (G, N)
    versions: torch.Tensor  # (B, L-1) policy version that sampled each completion token
    # (aligned with completion_mask; a completion spans several versions when the weights
    # changed while it was generated)
    truncated: torch.Tensor  # (B,) bool, stopped by the length limit
    # (B,) the episode each row is of, as an index into rewards.reshape(-1): row i's own for a
    # group's own completions (the first G*N rows, in rewards' order); its episode's for a
    # separate sample of an agent's episode (wire.Completion.sample_of), which takes that
    # episode's reward and advantage
    row_episode: torch.Tensor

    def to(self, device: torch.device) -> TrainBatch:
        return TrainBatch(*(t.to(device) for t in (
            self.input_ids, self.attention_mask, self.completion_mask, self.behav_logprobs,
            self.rewards, self.versions, self.truncated, self.row_episode)))

    @property
    def num_completion_tokens(self) -> int:
        return int(self.completion_mask.sum().item())


@dataclass(frozen=True)
class BatchRules:
    """What a batch from the buffer must be for `collate` and the model, beyond what the wire
    checks: the buffer is trusted to send these, the learner checks them anyway so that a wrong
    batch is refused and counted instead of crashing a step."""

    group_size: int  # generator.group_size: advantages work on (G, group_size) rows
    max_tokens: int  # RunConfig.max_completion_tokens: no completion is longer
    max_positions: int | None  # the model's max_position_embeddings, when it has one


def refusal(groups: list[TrajectoryGroup], asked: int, rules: BatchRules
            ) -> tuple[str, str] | None:
    """(reason, detail) when these groups cannot be trained on as one batch, else None."""
    if len(groups) > asked:
        return "too_many_groups", f"{len(groups)} groups for a request of {asked}"
    for g in groups:
        if len(g.episodes) != rules.group_size:
            return "bad_group_size", (f"prompt {g.prompt_id}: {len(g.episodes)} completions, "
                                      f"generator.group_size is {rules.group_size}")
        if len(g.prompt_tokens) == 0:
            return "empty_prompt", f"prompt {g.prompt_id} has no tokens"
        longest = max(len(c.tokens) for c in g.completions)
        if longest > rules.max_tokens or (rules.max_positions is not None and len(
                g.prompt_tokens) + longest > rules.max_positions):
            return "too_long", (f"prompt {g.prompt_id}: {len(g.prompt_tokens)} + {longest} "
                                f"tokens (at most {rules.max_tokens} after a prompt, model "
                                f"positions {rules.max_positions})")
    return None


def collate(groups: list[TrajectoryGroup], pad_id: int) -> TrainBatch:
    """All groups must have the same size (GRPO advantages are computed per (G, N) row). The
    rows: every group's own completions, in order (rewards' (G, N) layout), then the separate
    samples of agents' episodes, each pointing at its episode (row_episode)."""
    sizes = {len(g.episodes) for g in groups}
    if len(sizes) != 1:
        raise ValueError(f"groups of different sizes {sorted(sizes)} in one batch")
    (n,) = sizes
    seqs = [(g, c) for g in groups for c in g.episodes]
    row_episode = list(range(len(seqs)))
    for gi, g in enumerate(groups):
        for c in g.completions[n:]:
            seqs.append((g, c))
            row_episode.append(gi * n + c.sample_of)
    width = max(len(g.prompt_tokens) + len(c.tokens) for g, c in seqs)
    B = len(seqs)
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, width), dtype=torch.long)
    completion_mask = torch.zeros((B, width - 1))
    behav = torch.zeros((B, width - 1))
    versions = torch.zeros((B, width - 1), dtype=torch.long)
    for i, (g, c) in enumerate(seqs):
        P, T = len(g.prompt_tokens), len(c.tokens)
        input_ids[i, :P] = torch.from_numpy(g.prompt_tokens.astype("int64"))
        input_ids[i, P : P + T] = torch.from_numpy(c.tokens.astype("int64"))
        attention_mask[i, : P + T] = 1
        # Logits at position t predict token t+1: completion token j is predicted at P-1+j.
        completion_mask[i, P - 1 : P - 1 + T] = (
            1.0 if c.sources is None
            else torch.from_numpy((c.sources == 0).astype("float32")))
        behav[i, P - 1 : P - 1 + T] = torch.from_numpy(c.logprobs.astype("float32"))
        versions[i, P - 1 : P - 1 + T] = (g.policy_version if c.versions is None else
                                          torch.from_numpy(c.versions.astype("int64")))
    rewards = torch.tensor([[c.reward for c in g.episodes] for g in groups])
    truncated = truncated_from_finish_reasons([c.finish_reason for _, c in seqs])
    return TrainBatch(input_ids, attention_mask, completion_mask, behav, rewards, versions,
                      truncated, torch.tensor(row_episode, dtype=torch.long))


def token_staleness(batch: TrainBatch, version: int) -> dict[int, int]:
    """Completion tokens per staleness (policy versions between sampling and this update)."""
    lags = version - batch.versions[batch.completion_mask.bool()]  # one per completion token
    values, counts = torch.unique(lags, return_counts=True)
    return {int(v): int(n) for v, n in zip(values.tolist(), counts.tolist())}
