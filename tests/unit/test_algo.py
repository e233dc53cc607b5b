import math

import pytest
import torch

from asyncrl.algo.advantages import grpo_advantages
from asyncrl.algo.losses import ppo_clip_loss


def naive_grpo(rewards, normalize_std):
    out = []
    for row in rewards:
        mean = sum(row) / len(row)
        var = sum((r - mean) ** 2 for r in row) / (len(row) - 1)
        out.append([(r - mean) / (math.sqrt(var) + 1e-6) if normalize_std else r - mean
                    for r in row])
    return out


@pytest.mark.parametrize("normalize_std", [True, False])
def test_grpo_matches_naive_reference(normalize_std):
    torch.manual_seed(0)
    r = torch.rand(5, 8).round()
    got = grpo_advantages(r, normalize_std=normalize_std)
    want = torch.tensor(naive_grpo(r.tolist(), normalize_std))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_grpo_zero_mean_per_group_and_zero_for_uniform_groups():
    r = torch.tensor([[1.0, 0, 0, 1], [1, 1, 1, 1], [0.3, 0.7, 0.1, 0.9]])
    adv = grpo_advantages(r)
    torch.testing.assert_close(adv.mean(dim=1), torch.zeros(3), atol=1e-6, rtol=0)
    assert torch.all(adv[1] == 0)


def naive_clip_loss(logp, behav, adv, mask, lo, hi):
    total, count = 0.0, 0
    for b in range(len(logp)):
        for t in range(len(logp[b])):
            if not mask[b][t]:
                continue
            ratio = math.exp(logp[b][t] - behav[b][t])
            a = adv[b][0]
            clipped_ratio = min(max(ratio, 1 - lo), 1 + hi)
            total += -min(ratio * a, clipped_ratio * a)
            count += 1
    return total / count


def test_clipped_loss_matches_naive_token_loop():
    torch.manual_seed(1)
    B, T = 6, 7
    behav = -torch.rand(B, T) * 3
    logp = behav + torch.randn(B, T) * 0.4
    adv = torch.randn(B, 1)
    mask = (torch.rand(B, T) > 0.3).float()
    loss, m = ppo_clip_loss(logp, behav, adv, mask, 0.2, 0.28, float(mask.sum()),
                            log_ratio_clamp=20.0)
    want = naive_clip_loss(logp.tolist(), behav.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.28)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert 0 < m["clipfrac"] < 1


def test_at_ratio_one_loss_is_minus_mean_advantage():
    B, T = 4, 5
    behav = -torch.rand(B, T)
    adv = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    mask = torch.ones(B, T)
    loss, m = ppo_clip_loss(behav.clone(), behav, adv, mask, 0.2, 0.2, float(mask.sum()),
                            log_ratio_clamp=20.0)
    assert loss.item() == pytest.approx(-adv.mean().item(), rel=1e-6)
    assert m["clipfrac"] == 0 and m["approx_kl"] == pytest.approx(0, abs=1e-7)


def test_gradient_is_zero_for_tokens_clipped_on_the_losing_side():
    behav = torch.zeros(1, 4)
    # ratios: 1.5 (A>0, clipped), 0.5 (A<0, clipped), 1.1 (inside), 0.5 (A>0: not clipped)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.5]])).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, 1.0, 1.0]]).T.reshape(1, 4)
    loss, _ = ppo_clip_loss(logp, behav, adv, torch.ones(1, 4), 0.2, 0.2, 4.0, log_ratio_clamp=20.0)
    loss.backward()
    g = logp.grad[0]
    assert g[0] == 0 and g[1] == 0
    assert g[2] != 0 and g[3] != 0


def test_masked_tokens_do_not_contribute():
    behav = torch.zeros(2, 3)
    logp = torch.randn(2, 3, requires_grad=True)
    mask = torch.tensor([[1.0, 1, 0], [1, 0, 0]])
    loss, _ = ppo_clip_loss(logp, behav, torch.ones(2, 1), mask, 0.2, 0.2, 3.0,
                            log_ratio_clamp=20.0)
    loss.backward()
    assert torch.all(logp.grad[mask == 0] == 0)
