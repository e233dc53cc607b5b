import math

import pytest
import torch

from asyncrl.algo.advantages import (
    ADVANTAGE_ESTIMATORS,
    drgrpo_advantages,
    gae_advantages,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)


@pytest.mark.parametrize("normalize_std", [True, False])
def test_group_relative_advantages_have_zero_mean_per_group(normalize_std):
    torch.manual_seed(0)
    r = torch.rand(6, 5)
    adv = grpo_advantages(r, normalize_std=normalize_std)
    torch.testing.assert_close(adv.mean(dim=1), torch.zeros(6), atol=1e-6, rtol=0)


def test_drgrpo_is_reward_minus_group_mean_without_std():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 4.0, 6.0, 8.0]])
    want = torch.tensor([[0.75, -0.25, -0.25, -0.25], [-3.0, -1.0, 1.0, 3.0]])
    torch.testing.assert_close(drgrpo_advantages(r), want)


def test_rloo_matches_loop():
    torch.manual_seed(1)
    r = torch.rand(4, 6)
    want = []
    for row in r.tolist():
        out = []
        for i, ri in enumerate(row):
            others = [rj for j, rj in enumerate(row) if j != i]
            out.append(ri - sum(others) / len(others))
        want.append(out)
    torch.testing.assert_close(rloo_advantages(r), torch.tensor(want), rtol=1e-5, atol=1e-6)


def test_rloo_needs_two_samples_per_group():
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(torch.ones(3, 1))


@pytest.mark.parametrize("group_baseline", [False, True])
def test_reinforce_pp_matches_naive_batch_normalisation(group_baseline):
    torch.manual_seed(2)
    r = torch.rand(3, 4).round()
    rows = r.tolist()
    if group_baseline:
        centred = [[x - sum(row) / len(row) for x in row] for row in rows]
    else:
        flat_mean = sum(sum(row) for row in rows) / r.numel()
        centred = [[x - flat_mean for x in row] for row in rows]
    flat = [x for row in centred for x in row]
    mu = sum(flat) / len(flat)
    std = math.sqrt(sum((x - mu) ** 2 for x in flat) / (len(flat) - 1))
    want = torch.tensor([[x / (std + 1e-6) for x in row] for row in centred])
    got = reinforce_pp_advantages(r, group_baseline=group_baseline)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_estimator_dict_entries_share_a_signature():
    assert set(ADVANTAGE_ESTIMATORS) == {"grpo", "drgrpo", "rloo", "reinforce_pp",
                                         "reinforce_pp_baseline"}
    r = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    for name, fn in ADVANTAGE_ESTIMATORS.items():
        adv = fn(r)
        assert adv.shape == r.shape and torch.isfinite(adv).all(), name
        if name != "reinforce_pp":  # batch-mean baseline: a uniform group is not zero
            assert torch.all(adv[1] == 0), name


def naive_gae(rewards, values, mask, gamma, lam):
    """Forward sums over the valid positions of each row: A_t = sum_k (gamma lam)^k delta_{t+k}."""
    adv = [[0.0] * len(row) for row in rewards]
    for b in range(len(rewards)):
        idx = [t for t in range(len(rewards[b])) if mask[b][t]]
        v = [values[b][t] for t in idx] + [0.0]
        deltas = [rewards[b][t] + gamma * v[k + 1] - v[k] for k, t in enumerate(idx)]
        for k, t in enumerate(idx):
            adv[b][t] = sum((gamma * lam) ** j * deltas[k + j] for j in range(len(idx) - k))
    return adv


def test_gae_with_lambda_one_is_discounted_return_minus_value():
    torch.manual_seed(3)
    B, T, gamma = 3, 6, 0.9
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    mask = torch.ones(B, T)
    adv, ret = gae_advantages(rewards, values, mask, gamma, 1.0)
    discounted = torch.zeros(B, T)
    for t in range(T):
        discounted[:, t] = sum(gamma ** (k - t) * rewards[:, k] for k in range(t, T))
    torch.testing.assert_close(adv, discounted - values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret, discounted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lam", [0.3, 0.95])
def test_gae_matches_loop_with_padding_and_interior_mask(lam):
    torch.manual_seed(4)
    B, T, gamma = 4, 7, 0.97
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    mask = torch.ones(B, T)
    mask[1, 5:] = 0  # right padding
    mask[2, 2:4] = 0  # an interior span that is not the policy's (e.g. a tool output)
    mask[3, :] = 0
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    want = torch.tensor(naive_gae(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam))
    torch.testing.assert_close(adv, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret, (want + values) * mask, rtol=1e-5, atol=1e-5)
    assert torch.all(adv[mask == 0] == 0)


# All-equal rewards that are not dyadic fractions: their float32 mean is off by an ulp, which
# std + eps (std 0) used to turn into a same-sign advantage (+0.106 for eight rewards of 1.7).
NON_DYADIC = (1.7, 0.1, 1 / 3, -2.9, 1e-3, 12345.678)
GROUP_RELATIVE = ("grpo", "drgrpo", "rloo", "reinforce_pp_baseline")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [3, 7, 8, 16])
@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_all_equal_rewards_get_exactly_zero_advantage(name, n, dtype):
    for value in NON_DYADIC:
        uniform = torch.full((1, n), value, dtype=dtype)
        # the whole batch uniform: every estimator, reinforce_pp's batch baseline included
        adv = ADVANTAGE_ESTIMATORS[name](uniform.expand(3, n).clone())
        assert torch.equal(adv, torch.zeros(3, n, dtype=dtype)), (value, adv)
        if name not in GROUP_RELATIVE:
            continue
        # a uniform group next to groups with spread: still exactly zero, others untouched
        mixed = torch.cat([(torch.arange(n, dtype=dtype)[None] ** 2) / n, uniform,
                           torch.arange(n, dtype=dtype)[None] % 2])  # (3, n)
        adv = ADVANTAGE_ESTIMATORS[name](mixed)
        assert torch.equal(adv[1], torch.zeros(n, dtype=dtype)), (value, adv[1])
        assert torch.all(adv[0] != 0) and torch.all(adv[2] != 0)


@pytest.mark.parametrize("name", GROUP_RELATIVE)
def test_eight_rewards_of_1_7_are_zero_and_one_ulp_of_spread_has_the_right_sign(name):
    r = torch.full((1, 8), 1.7)
    assert torch.equal(ADVANTAGE_ESTIMATORS[name](r), torch.zeros(1, 8))
    # One ulp of spread is a real (if tiny) difference: the higher completion gets the only
    # positive advantage (float32 statistics gave all eight the same sign).
    r[0, 0] = torch.nextafter(r[0, 0], torch.tensor(2.0))
    adv = ADVANTAGE_ESTIMATORS[name](r)
    assert adv[0, 0] > 0 and torch.all(adv[0, 1:] < 0), adv


@pytest.mark.parametrize("garbage", [math.inf, -math.inf, math.nan])
def test_gae_ignores_rewards_and_values_at_masked_positions(garbage):
    torch.manual_seed(5)
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    mask = torch.ones(3, 6)
    mask[0, 4:] = 0
    mask[1, 1:3] = 0
    want = gae_advantages(rewards, values, mask, 0.99, 0.95)
    bad_r = torch.where(mask == 0, garbage, rewards)
    bad_v = torch.where(mask == 0, garbage, values)
    got = gae_advantages(bad_r, bad_v, mask, 0.99, 0.95)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ------------------------------------------------------------ per-token placement and whitening


def test_terminal_token_rewards_put_each_outcome_on_the_last_valid_token():
    from asyncrl.algo.advantages import terminal_token_rewards

    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    rewards = torch.tensor([2.0, -1.0, 5.0])
    want = torch.zeros(3, 4)
    for b in range(3):  # naive: scan for the last 1
        valid = [t for t in range(4) if mask[b, t]]
        if valid:
            want[b, valid[-1]] = rewards[b]
    assert torch.equal(terminal_token_rewards(rewards, mask), want)


def test_reward_to_go_is_the_suffix_sum():
    from asyncrl.algo.advantages import reward_to_go

    torch.manual_seed(3)
    r = torch.randn(2, 5)
    want = torch.tensor([[sum(r[b, s].item() for s in range(t, 5)) for t in range(5)]
                         for b in range(2)])
    torch.testing.assert_close(reward_to_go(r), want)


def test_masked_whiten_matches_a_loop_and_ignores_masked_values():
    from asyncrl.algo.advantages import masked_whiten

    torch.manual_seed(4)
    x = torch.randn(3, 4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 0, 1]])
    vals = [x[b, t].item() for b in range(3) for t in range(4) if mask[b, t]]
    mean = sum(vals) / len(vals)
    std = (sum((v - mean) ** 2 for v in vals) / len(vals)) ** 0.5
    want = torch.tensor([[(x[b, t].item() - mean) / (std + 1e-6) if mask[b, t] else 0.0
                          for t in range(4)] for b in range(3)])
    torch.testing.assert_close(masked_whiten(x, mask), want)
    bad = x.clone()
    bad[0, 3] = float("nan")  # a masked position's garbage reaches nothing
    assert torch.equal(masked_whiten(bad, mask), masked_whiten(x, mask))
