import math

import pytest
import torch

from asyncrl.algo.kl import KL_ESTIMATORS, kl_k1, kl_k2, kl_k3, kl_loss, kl_reward_penalty
from asyncrl.algo.losses import (
    LOSS_NORMALISERS,
    entropy_bonus_loss,
    entropy_from_logits,
    explained_variance,
    masked_mean,
    masked_sum_over,
    ppo_clip_loss,
    value_loss,
)


def test_normalisers_give_token_mean_sequence_mean_and_constant():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    token = masked_sum_over(values, mask, LOSS_NORMALISERS["token_mean"](mask, None))
    seq = masked_sum_over(values, mask, LOSS_NORMALISERS["seq_mean"](mask, None))
    const = masked_sum_over(values, mask, LOSS_NORMALISERS["constant"](mask, 8))
    assert token.item() == pytest.approx(20 / 5)
    assert seq.item() == pytest.approx((10 / 4 + 10 / 1) / 2)
    assert const.item() == pytest.approx(20 / (2 * 8))
    with pytest.raises(ValueError, match="max_tokens"):
        LOSS_NORMALISERS["constant"](mask, None)


def naive_dual_clip(ratios, advs, lo, hi, c):
    out = []
    for r, a in zip(ratios, advs, strict=True):
        loss = -min(r * a, min(max(r, 1 - lo), 1 + hi) * a)
        if a < 0:
            loss = min(loss, -c * a)
        out.append(loss)
    return sum(out) / len(out)


def test_dual_clip_matches_loop_and_caps_negative_advantage_loss():
    ratios = [0.5, 0.9, 1.1, 2.0, 3.5, 5.0, 0.7, 4.0]
    advs = [-1.0, -2.0, 0.5, -1.0, -1.5, -0.5, 1.0, 2.0]
    logp = torch.log(torch.tensor([ratios]))
    adv = torch.tensor([advs])
    loss, m = ppo_clip_loss(logp, torch.zeros(1, 8), adv, torch.ones(1, 8), 0.2, 0.28, 8.0,
                            clip_c=3.0, log_ratio_clamp=20.0)
    assert loss.item() == pytest.approx(naive_dual_clip(ratios, advs, 0.2, 0.28, 3.0), rel=1e-6)
    assert m["dual_clipfrac"] == pytest.approx(2 / 8)  # ratios 3.5 and 5.0 with A < 0
    plain, _ = ppo_clip_loss(logp, torch.zeros(1, 8), adv, torch.ones(1, 8), 0.2, 0.28, 8.0,
                             log_ratio_clamp=20.0)
    assert loss.item() < plain.item()


def test_dual_clip_gradient_is_zero_where_any_clip_is_active():
    # ratio 5 with A<0: dual-clipped; 0.5 with A<0: clipped on the losing side;
    # 1.5 with A>0: clipped; 2.0 with A<0: below c, so it keeps its gradient.
    logp = torch.log(torch.tensor([[5.0, 0.5, 1.5, 2.0]])).requires_grad_()
    adv = torch.tensor([[-1.0, -1.0, 1.0, -1.0]])
    loss, _ = ppo_clip_loss(logp, torch.zeros(1, 4), adv, torch.ones(1, 4), 0.2, 0.2, 4.0,
                            clip_c=3.0, log_ratio_clamp=20.0)
    loss.backward()
    g = logp.grad[0]
    assert g[0] == 0 and g[1] == 0 and g[2] == 0 and g[3] != 0
    with pytest.raises(ValueError, match="clip_c > 1"):
        ppo_clip_loss(logp, torch.zeros(1, 4), adv, torch.ones(1, 4), 0.2, 0.2, 4.0, clip_c=1.0,
                      log_ratio_clamp=20.0)


def test_weights_multiply_each_tokens_loss():
    behav = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, -2.0, 0.5]])
    w = torch.tensor([[0.5, 2.0, 1.0]])
    loss, _ = ppo_clip_loss(behav.clone(), behav, adv, torch.ones(1, 3), 0.2, 0.2, 3.0,
                            weights=w, log_ratio_clamp=20.0)
    assert loss.item() == pytest.approx(-(0.5 * 1 + 2 * -2 + 0.5) / 3)


def test_entropy_matches_loop_and_bonus_aggregates_it():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    want = torch.zeros(2, 3)
    for b in range(2):
        for t in range(3):
            z = [math.exp(x) for x in logits[b, t].tolist()]
            p = [x / sum(z) for x in z]
            want[b, t] = -sum(pi * math.log(pi) for pi in p)
    torch.testing.assert_close(entropy_from_logits(logits), want, rtol=1e-5, atol=1e-6)
    uniform = entropy_from_logits(torch.zeros(1, 1, 7))
    assert uniform.item() == pytest.approx(math.log(7), rel=1e-6)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss, m = entropy_bonus_loss(entropy_from_logits(logits), mask, 3.0)
    assert loss.item() == pytest.approx(-(want * mask).sum().item() / 3, rel=1e-5)
    assert m["entropy"] == pytest.approx((want * mask).sum().item() / 3, rel=1e-5)


def naive_value_loss(v, old, ret, clip):
    total = 0.0
    for vi, oi, ri in zip(v, old, ret, strict=True):
        vc = oi + min(max(vi - oi, -clip), clip)
        total += 0.5 * max((vi - ri) ** 2, (vc - ri) ** 2)
    return total / len(v)


def test_value_clipping_matches_loop_and_stops_gradient_past_the_clip():
    old = [0.0, 0.0, 1.0, 1.0]
    v = [0.5, -0.1, 1.05, 2.0]
    ret = [2.0, 0.0, 1.0, 1.2]
    values = torch.tensor([v], requires_grad=True)
    loss, m = value_loss(values, torch.tensor([old]), torch.tensor([ret]), torch.ones(1, 4),
                         0.2, 4.0)
    assert loss.item() == pytest.approx(naive_value_loss(v, old, ret, 0.2), rel=1e-6)
    loss.backward()
    # token 0 moved past the clip towards its target: the clipped error (larger) is chosen,
    # so its gradient is zero; token 1 stays inside the clip range.
    assert values.grad[0, 0] == 0 and values.grad[0, 1] != 0
    assert m["value_clipfrac"] == pytest.approx(1 / 4)
    plain, _ = value_loss(values, torch.tensor([old]), torch.tensor([ret]), torch.ones(1, 4),
                          None, 4.0)
    want = sum(0.5 * (a - b) ** 2 for a, b in zip(v, ret, strict=True)) / 4
    assert plain.item() == pytest.approx(want, rel=1e-6)


def test_explained_variance():
    ret = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    assert explained_variance(ret, ret, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(ret, 2.5), ret, mask) == pytest.approx(0.0)
    assert explained_variance(-ret, ret, mask) < 0
    assert math.isnan(explained_variance(ret, torch.ones(1, 4), mask))


def test_kl_estimators_are_zero_when_policies_agree():
    logp = -torch.rand(3, 4) * 5
    for name, fn in KL_ESTIMATORS.items():
        assert torch.all(fn(logp, logp.clone(), 10.0) == 0), name


def test_kl_estimators_match_their_formulas_and_k3_is_nonnegative():
    torch.manual_seed(1)
    logp = -torch.rand(4, 6) * 4
    ref = -torch.rand(4, 6) * 4
    k3 = kl_k3(logp, ref, 10.0)
    assert torch.all(k3 >= 0)
    for (lp, rf), got1, got2, got3 in zip(zip(logp.flatten().tolist(), ref.flatten().tolist(),
                                              strict=True),
                                          kl_k1(logp, ref, 10.0).flatten().tolist(),
                                          kl_k2(logp, ref, 10.0).flatten().tolist(),
                                          k3.flatten().tolist(), strict=True):
        r = math.exp(rf) / math.exp(lp)  # ref / current
        assert got1 == pytest.approx(math.log(math.exp(lp) / math.exp(rf)), abs=1e-5)
        assert got2 == pytest.approx(0.5 * math.log(r) ** 2, abs=1e-5)
        assert got3 == pytest.approx((r - 1) - math.log(r), abs=1e-5)


def test_kl_as_reward_penalty_and_as_loss():
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0, -0.1]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    shaped, m = kl_reward_penalty(torch.tensor([[0.0, 0.0, 1.0]]), logp, ref, mask, 0.1, "k1",
                                  kl_clamp=10.0)
    torch.testing.assert_close(shaped, torch.tensor([[-0.05, 0.0, 0.0]]))
    assert not shaped.requires_grad and m["kl"] == pytest.approx(0.25)
    loss, m = kl_loss(logp, ref, mask, 2.0, "k2", kl_clamp=10.0)
    assert loss.item() == pytest.approx(0.5 * 0.25 / 2)
    loss.backward()
    assert logp.grad[0, 0] != 0 and logp.grad[0, 2] == 0
    with pytest.raises(ValueError, match="k1"):
        kl_loss(logp, ref, mask, 2.0, "k4", kl_clamp=10.0)


# NaN safety: what masked positions hold must not reach the loss or the gradient.
GARBAGE = (math.inf, -math.inf, math.nan, 1e30)


@pytest.mark.parametrize("garbage", GARBAGE)
def test_masked_sum_over_ignores_masked_values(garbage):
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    for normaliser in (4.0, LOSS_NORMALISERS["seq_mean"](mask, None)):
        got = masked_sum_over(torch.where(mask == 0, garbage, values), mask, normaliser)
        assert torch.equal(got, masked_sum_over(values, mask, normaliser))
        (grad,) = torch.autograd.grad(got, values)
        assert torch.isfinite(grad).all() and torch.all(grad[mask == 0] == 0)


@pytest.mark.parametrize("garbage", GARBAGE)
def test_masked_mean_ignores_masked_values(garbage):
    values = torch.tensor([[1.0, garbage, 3.0], [garbage, garbage, 8.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    assert masked_mean(values, mask).item() == 4.0
    assert masked_mean(values, torch.zeros(2, 3)).item() == 0.0


@pytest.mark.parametrize("garbage", GARBAGE)
@pytest.mark.parametrize("clip_range", [None, 0.2])
def test_value_loss_ignores_masked_values_returns_and_old_values(garbage, clip_range):
    torch.manual_seed(5)
    values, old, ret = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 1.0]])

    def run(v, o, r):
        v = v.clone().requires_grad_()
        loss, m = value_loss(v, o, r, mask, clip_range, 5.0)
        loss.backward()
        return loss, v.grad, m

    want = run(values, old, ret)
    got = run(*(torch.where(mask == 0, garbage, x) for x in (values, old, ret)))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[2] == want[2]


@pytest.mark.parametrize("garbage", GARBAGE)
def test_entropy_bonus_ignores_masked_positions(garbage):
    torch.manual_seed(6)
    entropy = entropy_from_logits(torch.randn(2, 3, 5))  # (B, T)
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])

    def run(x):
        x = x.clone().requires_grad_()
        loss, m = entropy_bonus_loss(x, mask, 4.0)
        loss.backward()
        return loss, x.grad, m

    want = run(entropy)
    bad = entropy.clone()
    bad[0, 1] = bad[1, 2] = garbage
    got = run(bad)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[2] == want[2]


@pytest.mark.parametrize("weights", [None, torch.tensor([[1.0, math.inf]])])
def test_ppo_masked_token_with_a_huge_log_ratio_leaves_the_loss_finite(weights):
    # The case: A < 0 at a masked token whose ratio overflows; multiplying the mask in
    # gave inf * 0 = NaN. A clamp of 1e4 lets exp overflow: the mask alone must hold.
    for clamp in (20.0, 1e4):
        logp = torch.tensor([[0.0, 100.0]], requires_grad=True)
        loss, m = ppo_clip_loss(logp, torch.zeros(1, 2), torch.tensor([[-1.0, math.nan]]),
                                torch.tensor([[1.0, 0.0]]), 0.2, 0.2, 1.0, weights=weights,
                                log_ratio_clamp=clamp)
        loss.backward()
        assert loss.item() == 1.0 and torch.equal(logp.grad, torch.tensor([[1.0, 0.0]]))
        assert m["ratio_max"] == 1.0 and m["approx_kl"] == 0.0


def test_kl_estimators_are_clamped_at_the_configured_bound():
    log_r = torch.tensor([-math.inf, -60.0, -20.0, -11.5, -1.0, 0.5, 2.0, 3.5, 20.0, 50.0,
                          math.inf])  # log q/p
    ref = torch.zeros_like(log_r)
    naive = {  # float64 references
        "k1": -log_r.double(),
        "k2": 0.5 * log_r.double() ** 2,
        "k3": (torch.expm1(log_r.double()) - log_r.double()).nan_to_num(nan=math.inf),
    }  # (k3 at +inf is inf - inf in floating point)
    assert naive["k3"][8] > 4.8e8  # the unclamped k3 at a log-ratio of 20
    for clamp in (10.0, 1000.0):
        for name, fn in KL_ESTIMATORS.items():
            logp = (-log_r).clone().requires_grad_()
            kl = fn(logp, ref, clamp)
            want = naive[name].clamp(-clamp, clamp)
            torch.testing.assert_close(kl.double(), want, rtol=1e-6, atol=1e-6)
            assert kl.max().item() == pytest.approx(clamp), (name, clamp)
            (grad,) = torch.autograd.grad(kl.sum(), logp)
            assert torch.isfinite(grad).all(), name
            inside = naive[name].abs() < clamp
            # the gradient stops exactly at the bound, and not before it
            assert torch.all(grad[~inside] == 0) and torch.all(grad[inside] != 0), (name, grad)
    with pytest.raises(ValueError, match="clamp"):
        kl_k3(ref, ref, math.inf)


@pytest.mark.parametrize("estimator", sorted(KL_ESTIMATORS))
def test_kl_loss_and_penalty_follow_kl_clamp_and_ignore_masked_tokens(estimator):
    logp = torch.tensor([[-1.0, -2.0, -0.5, -1.0]])
    ref = torch.tensor([[-21.0, -2.5, -math.inf, math.nan]])  # log q/p: -20, -0.5, -inf, nan
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    for kl_clamp in (10.0, 3.0):
        lp = logp.clone().requires_grad_()
        loss, m = kl_loss(lp, ref, mask, 3.0, estimator, kl_clamp=kl_clamp)
        loss.backward()
        per_token = KL_ESTIMATORS[estimator](logp[:, :3], ref[:, :3], kl_clamp)
        assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
        assert loss.item() == pytest.approx(per_token.sum().item() / 3, rel=1e-6)
        assert per_token[0, 0] == kl_clamp and per_token[0, 2] == kl_clamp  # both extremes
        assert lp.grad[0, 0] == 0 and lp.grad[0, 2] == 0 and lp.grad[0, 3] == 0
        assert lp.grad[0, 1] != 0
        rewards = torch.tensor([[0.0, 0.0, 0.0, math.nan]])  # garbage where masked
        shaped, pm = kl_reward_penalty(rewards, logp, ref, mask, 0.5, estimator,
                                       kl_clamp=kl_clamp)
        torch.testing.assert_close(shaped, torch.cat([-0.5 * per_token, torch.zeros(1, 1)], 1))
        assert pm["kl"] == pytest.approx(m["kl"])
