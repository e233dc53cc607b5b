import math

import pytest
import torch

from asyncrl.algo.losses import LOSS_NORMALISERS, ppo_clip_loss
from asyncrl.algo.offpolicy import OFFPOLICY_CORRECTIONS, importance_ess, offpolicy_pg_loss

PARAMS = {"is_cap": 2.0, "is_low": 0.5, "is_high": 2.0}
LRC = 20.0  # learner.log_ratio_clamp's default


def test_dict_names():
    assert set(OFFPOLICY_CORRECTIONS) == {"none", "decoupled", "tis", "icepop", "seq_mask"}
    with pytest.raises(ValueError, match="seq_mask"):
        offpolicy_pg_loss("ppo", torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1),
                          torch.ones(1, 1), torch.ones(1, 1), 0.2, 0.2, 1.0, log_ratio_clamp=LRC)
    with pytest.raises(ValueError, match="is_cap"):
        offpolicy_pg_loss("tis", torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1),
                          torch.ones(1, 1), torch.ones(1, 1), 0.2, 0.2, 1.0, log_ratio_clamp=LRC)


@pytest.mark.parametrize("name", sorted(OFFPOLICY_CORRECTIONS))
def test_on_fresh_data_every_correction_is_plain_ppo(name):
    torch.manual_seed(0)
    B, T = 4, 6
    behav = -torch.rand(B, T) * 3
    adv = torch.randn(B, 1)
    mask = (torch.rand(B, T) > 0.2).float()
    logp = behav.clone().requires_grad_()
    loss, m = offpolicy_pg_loss(name, logp, behav.clone(), behav.clone(), adv, mask, 0.2, 0.28,
                                float(mask.sum()), **PARAMS, log_ratio_clamp=LRC)
    ref_logp = behav.clone().requires_grad_()
    want, _ = ppo_clip_loss(ref_logp, behav, adv, mask, 0.2, 0.28, float(mask.sum()),
                            log_ratio_clamp=LRC)
    loss.backward()
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert loss.item() == pytest.approx(-(adv * mask).sum().item() / mask.sum().item(), rel=1e-5)
    torch.testing.assert_close(logp.grad, ref_logp.grad)
    assert m["ratio_mean"] == pytest.approx(1.0) and m["is_weight_mean"] == pytest.approx(1.0)
    assert m["is_ess"] == pytest.approx(1.0)
    assert m["is_masked_frac"] == 0 and m["is_truncated_frac"] == 0 and m["clipfrac"] == 0
    assert m["behav_vs_prox"] == 0 and m["prox_vs_current"] == 0


def stale_batch():
    """Known prox/behav weights per token; current == prox, so the PPO ratio is 1 and the
    gradient of each token is -weight * A / normaliser."""
    weights = torch.tensor([[1.0, 0.3, 3.0, 1.5], [0.8, 1.2, 0.9, 1.1], [4.0, 5.0, 3.0, 6.0]])
    behav = -torch.ones(3, 4)
    prox = behav + torch.log(weights)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    return weights, behav, prox, mask


def grads(name, **params):
    weights, behav, prox, mask = stale_batch()
    logp = prox.clone().requires_grad_()
    adv = torch.ones(3, 1)
    loss, m = offpolicy_pg_loss(name, logp, prox, behav, adv, mask, 0.2, 0.2, 1.0, **params,
                                log_ratio_clamp=LRC)
    loss.backward()
    return -logp.grad, m  # effective per-token weight, since A = 1 and normaliser = 1


def test_decoupled_weights_by_prox_over_behav_and_drops_above_cap():
    weights, _, _, mask = stale_batch()
    w, m = grads("decoupled")
    torch.testing.assert_close(w, weights * mask)
    w, m = grads("decoupled", is_cap=2.0)
    torch.testing.assert_close(w, weights * mask * (weights <= 2.0))
    assert m["is_masked_frac"] == pytest.approx(5 / 11)


def test_decoupled_clips_against_prox_not_behav():
    behav = torch.zeros(1, 2)
    prox = torch.log(torch.tensor([[2.0, 2.0]]))  # stale by a factor 2, inside no clip range
    logp = (prox + torch.log(torch.tensor([[1.1, 1.5]]))).requires_grad_()
    loss, m = offpolicy_pg_loss("decoupled", logp, prox, behav, torch.ones(1, 2),
                                torch.ones(1, 2), 0.2, 0.2, 2.0, log_ratio_clamp=LRC)
    assert loss.item() == pytest.approx(-(2 * 1.1 + 2 * 1.2) / 2, rel=1e-6)
    assert m["clipfrac"] == pytest.approx(0.5)
    assert m["behav_vs_prox"] == pytest.approx(math.log(2))
    assert m["prox_vs_current"] == pytest.approx((math.log(1.1) + math.log(1.5)) / 2)


def test_tis_weights_are_capped_at_c():
    weights, _, _, mask = stale_batch()
    w, m = grads("tis", is_cap=2.0)
    torch.testing.assert_close(w, weights.clamp(max=2.0) * mask)
    assert w.max().item() == pytest.approx(2.0)
    assert m["is_truncated_frac"] == pytest.approx(5 / 11) and m["is_masked_frac"] == 0


def test_icepop_masks_exactly_the_out_of_range_tokens():
    weights, _, _, mask = stale_batch()
    w, m = grads("icepop", is_low=0.5, is_high=2.0)
    in_range = (weights >= 0.5) & (weights <= 2.0) & mask.bool()
    assert torch.equal(w != 0, in_range)
    torch.testing.assert_close(w[in_range], weights[in_range])
    assert m["is_masked_frac"] == pytest.approx(6 / 11)


def test_seq_mask_masks_whole_sequences():
    weights, _, _, mask = stale_batch()
    w, m = grads("seq_mask", is_low=0.5, is_high=2.0)
    # geometric means: row 0 (1*0.3*3*1.5)^(1/4) ~ 1.06, row 1 over its 3 valid tokens ~ 0.96,
    # row 2 ~ 4.4: only row 2 is rejected, and kept rows get no importance weight.
    torch.testing.assert_close(w, mask * torch.tensor([[1.0], [1.0], [0.0]]))
    assert m["is_masked_frac"] == pytest.approx(4 / 11)


def test_none_ignores_prox_and_takes_the_ratio_against_behav():
    weights, behav, prox, mask = stale_batch()
    adv = torch.randn(3, 1)
    loss, _ = offpolicy_pg_loss("none", prox, prox, behav, adv, mask, 0.2, 0.2, 11.0,
                                log_ratio_clamp=LRC)
    want, _ = ppo_clip_loss(prox, behav, adv, mask, 0.2, 0.2, 11.0, log_ratio_clamp=LRC)
    assert loss.item() == pytest.approx(want.item())


def test_importance_ess():
    ones = torch.ones(1, 4)
    assert importance_ess(torch.tensor([[1.0, 1.0, 1.0, 1.0]]), ones) == pytest.approx(1.0)
    assert importance_ess(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), ones) == pytest.approx(0.25)
    w = [0.5, 1.0, 2.0, 4.0]
    want = sum(w) ** 2 / (4 * sum(x * x for x in w))
    assert importance_ess(torch.tensor([w]), ones) == pytest.approx(want)
    # masked tokens do not count
    assert importance_ess(torch.tensor([[1.0, 9.0]]), torch.tensor([[1.0, 0.0]])) == 1.0


def test_seq_mask_uses_the_geometric_mean_not_the_product():
    # every token 1.3x more likely under prox: geometric mean 1.3 (kept), product 1.3^5 ~ 3.7;
    # the second sequence is 2.5x on every token and is rejected, however short.
    behav = torch.zeros(2, 5)
    prox = torch.log(torch.tensor([[1.3] * 5, [2.5] * 5]))
    mask = torch.tensor([[1.0] * 5, [1.0, 1.0, 0.0, 0.0, 0.0]])
    logp = prox.clone().requires_grad_()
    loss, m = offpolicy_pg_loss("seq_mask", logp, prox, behav, torch.ones(2, 1), mask, 0.2, 0.2,
                                7.0, is_low=0.5, is_high=2.0, log_ratio_clamp=LRC)
    loss.backward()
    assert torch.all(logp.grad[0] != 0) and torch.all(logp.grad[1] == 0)
    assert m["is_masked_frac"] == pytest.approx(2 / 7)


# NaN safety. Masked and dropped tokens may hold anything; the loss and the kept tokens'
# gradients must not see it. "Benign" batches hold ordinary values at the same positions.
AGGS = ("token_mean", "seq_mean", "constant")
# (behav, current) at a hostile token, relative to its prox logprob p; current may be None.
HOSTILE = {
    "behav=-inf": (lambda p: torch.full_like(p, -math.inf), None),
    "behav=-1e4": (lambda p: torch.full_like(p, -1e4), None),
    "behav=-101": (lambda p: torch.full_like(p, -101.0), None),  # prox -1: exp(100) is inf
    "log_ratio=+50": (lambda p: p - 50, lambda p: p + 50),
    "log_ratio=-50": (lambda p: p + 50, lambda p: p - 50),
}
# Only where the mask excludes the token: log-ratio -inf - -inf = NaN (e.g. a model's NaN or
# -inf output on padding).
MASKED_ONLY = {
    "current=behav=-inf": (lambda p: torch.full_like(p, -math.inf),
                           lambda p: torch.full_like(p, -math.inf)),
    "current=nan": (lambda p: p, lambda p: torch.full_like(p, math.nan)),
}
# 1e4 lets exp overflow float32 after the clamp, so the masks alone must keep inf out.
CLAMPS = (LRC, 1e4)


def nan_batch():
    """B=4, T=6, float32: prox near -1, behav within 10% of it, current within the PPO clip;
    row 1 padded after 4 tokens, row 3 after 2."""
    g = torch.Generator().manual_seed(7)
    prox = -1.0 - torch.rand(4, 6, generator=g)
    behav = prox + (torch.rand(4, 6, generator=g) - 0.5) * 0.2
    logp = prox + (torch.rand(4, 6, generator=g) - 0.5) * 0.2
    mask = torch.ones(4, 6)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    adv = torch.tensor([[1.0], [-0.5], [2.0], [-1.5]]).expand(4, 6).clone()
    return logp, prox, behav, mask, adv


def run(name, agg, logp, prox, behav, mask, adv, log_ratio_clamp=LRC):
    logp = logp.clone().requires_grad_()
    normaliser = LOSS_NORMALISERS[agg](mask, 6)
    loss, m = offpolicy_pg_loss(name, logp, prox, behav, adv, mask, 0.2, 0.28, normaliser,
                                clip_c=3.0, **PARAMS, log_ratio_clamp=log_ratio_clamp)
    loss.backward()
    return loss, logp.grad, m


def poison(where, hostile, logp, prox, behav):
    """Copies with the hostile values at the positions `where` (bool (B, T))."""
    behav_fn, cur_fn = {**HOSTILE, **MASKED_ONLY}[hostile]
    behav = torch.where(where, behav_fn(prox), behav)
    if cur_fn is not None:
        logp = torch.where(where, cur_fn(prox), logp)
    return logp, prox, behav


@pytest.mark.parametrize("clamp", CLAMPS)
@pytest.mark.parametrize("hostile", sorted({**HOSTILE, **MASKED_ONLY}))
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("name", sorted(OFFPOLICY_CORRECTIONS))
def test_masked_positions_change_neither_loss_nor_gradient(name, agg, hostile, clamp):
    logp, prox, behav, mask, adv = nan_batch()
    masked = mask == 0
    want_loss, want_grad, want_m = run(name, agg, logp, prox, behav, mask, adv, clamp)
    bad_adv = torch.where(masked, torch.nan, adv)  # garbage advantages there too
    loss, grad, m = run(name, agg, *poison(masked, hostile, logp, prox, behav), mask, bad_adv,
                        clamp)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert torch.equal(loss, want_loss) and torch.equal(grad, want_grad)
    assert m == want_m  # every metric is over valid tokens only
    assert torch.all(grad[masked] == 0) and torch.all(grad[~masked] != 0)


# Valid tokens the correction drops (or, for tis, truncates): the benign value is a weight
# prox/behav = 5, outside is_cap = is_high = 2, so the same tokens are dropped either way.
DROPPING = ("decoupled", "icepop", "seq_mask", "tis")
HUGE_WEIGHT = ("behav=-inf", "behav=-1e4", "behav=-101", "log_ratio=+50")


@pytest.mark.parametrize("clamp", CLAMPS)
@pytest.mark.parametrize("hostile", HUGE_WEIGHT)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("name", DROPPING)
def test_dropped_tokens_do_not_change_the_kept_tokens_gradients(name, agg, hostile, clamp):
    logp, prox, behav, mask, adv = nan_batch()
    if name == "seq_mask":  # a whole sequence is rejected: give all of row 2 a weight of 5
        dropped = torch.zeros_like(mask, dtype=torch.bool)
        dropped[2] = True
        hostile_at = dropped & (torch.arange(6) == 3)
    else:
        dropped = torch.zeros_like(mask, dtype=torch.bool)
        dropped[0, 1] = dropped[2, 3] = dropped[1, 0] = True
        hostile_at = dropped
    behav = torch.where(dropped, prox - math.log(5.0), behav)
    want_loss, want_grad, want_m = run(name, agg, logp, prox, behav, mask, adv, clamp)
    bad = poison(hostile_at, hostile, logp, prox, behav)
    loss, grad, m = run(name, agg, *bad, mask, adv, clamp)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    corr = OFFPOLICY_CORRECTIONS[name](bad[1], bad[2], mask, **PARAMS, log_ratio_clamp=clamp)
    if corr.weights is not None:  # the weights a correction hands on are finite
        assert torch.isfinite(corr.weights).all()
    if name in ("decoupled", "icepop"):  # and exactly 0 where it drops
        assert torch.all(corr.weights[~corr.keep] == 0)
    if name == "tis":  # truncated, not dropped: the weight is is_cap either way
        assert m["is_truncated_frac"] == want_m["is_truncated_frac"] > 0
        if hostile != "log_ratio=+50":  # there the token's own current/prox ratio differs
            assert torch.equal(loss, want_loss) and torch.equal(grad, want_grad)
        kept = ~hostile_at
        assert torch.equal(grad[kept], want_grad[kept])
    else:
        assert m["is_masked_frac"] == want_m["is_masked_frac"] > 0
        assert torch.equal(loss, want_loss) and torch.equal(grad, want_grad)
        assert torch.all(grad[dropped] == 0) and torch.all(grad[mask.bool() & ~dropped] != 0)


@pytest.mark.parametrize("hostile", sorted(HOSTILE))
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("name", sorted(OFFPOLICY_CORRECTIONS))
def test_extreme_values_on_kept_tokens_give_a_finite_loss_and_gradient(name, agg, hostile):
    logp, prox, behav, mask, adv = nan_batch()
    at = torch.zeros_like(mask, dtype=torch.bool)
    at[0, 2] = at[1, 1] = True  # A > 0 and A < 0 (dual-clip caps the latter)
    want_loss, want_grad, _ = run(name, agg, logp, prox, behav, mask, adv)
    loss, grad, m = run(name, agg, *poison(at, hostile, logp, prox, behav), mask, adv)
    assert torch.isfinite(loss) and torch.isfinite(grad).all(), (loss, grad)
    for key in ("ratio_max", "ratio_min", "approx_kl", "is_weight_max", "is_ess", "pg_loss"):
        assert math.isfinite(m[key]), key
    # The other rows' tokens do not depend on these two (seq_mask decides per row).
    others = torch.ones_like(at)
    others[:2] = False
    assert torch.equal(grad[others], want_grad[others])


def test_the_issue_case_behav_minus_101_is_finite_for_decoupled_and_icepop():
    behav = torch.tensor([[-101.0, -1.0]])
    prox = torch.tensor([[-1.0, -1.0]])
    for name in ("decoupled", "icepop"):
        logp = prox.clone().requires_grad_()
        loss, m = offpolicy_pg_loss(name, logp, prox, behav, torch.ones(1, 1), torch.ones(1, 2),
                                    0.2, 0.2, 2.0, **PARAMS, log_ratio_clamp=LRC)
        loss.backward()
        assert loss.item() == pytest.approx(-0.5), name  # the second token alone, weight 1
        assert torch.equal(logp.grad, torch.tensor([[0.0, -0.5]])), name
        assert m["is_masked_frac"] == 0.5 and m["is_weight_max"] == pytest.approx(math.exp(LRC))


@pytest.mark.parametrize("log_ratio_clamp", [20.0, 5.0])
def test_the_log_ratio_clamp_bounds_every_ratio_and_weight(log_ratio_clamp):
    prox = torch.full((1, 4), -1.0)
    behav = prox + torch.tensor([[60.0, -60.0, 0.0, 0.0]])  # prox/behav: e^-60, e^60
    logp = prox + torch.tensor([[0.0, 0.0, 50.0, -50.0]])  # current/prox: e^50, e^-50
    bound = math.exp(log_ratio_clamp)
    _, _, m = run("tis", "token_mean", logp, prox, behav, torch.ones(1, 4), torch.ones(1, 4),
                  log_ratio_clamp=log_ratio_clamp)
    assert m["is_weight_max"] == pytest.approx(bound)
    assert m["ratio_max"] == pytest.approx(bound) and m["ratio_min"] == pytest.approx(1 / bound)
    # seq_mask: the sequence's mean log-ratio, 100/50 = 2 > log 2, is what is clamped; clamping
    # each token first (to 20 or 5) would dilute the extreme one into an accepted mean.
    seq_prox = torch.full((1, 50), -1.0)
    seq_behav = seq_prox.clone()
    seq_behav[0, 7] = -101.0
    _, _, m = run("seq_mask", "token_mean", seq_prox, seq_prox, seq_behav, torch.ones(1, 50),
                  torch.ones(1, 50), log_ratio_clamp=log_ratio_clamp)
    assert m["is_masked_frac"] == 1.0
    with pytest.raises(ValueError, match="log_ratio_clamp"):
        run("none", "token_mean", logp, prox, behav, torch.ones(1, 4), torch.ones(1, 4),
            log_ratio_clamp=0.0)


def test_behaviour_proximal_mismatch_mean_max_and_k3():
    # log w = prox - behav: +log 2, -log 2 and a masked token that must not count
    behav = torch.zeros(1, 3)
    prox = torch.tensor([[math.log(2), -math.log(2), 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    _, m = offpolicy_pg_loss("none", prox.clone().requires_grad_(), prox, behav,
                             torch.ones(1, 3), mask, 0.2, 0.2, 2.0, log_ratio_clamp=LRC)
    naive_k3 = [(w - 1) - math.log(w) for w in (2.0, 0.5)]  # k3 = (r - 1) - log r
    assert m["behav_vs_prox"] == pytest.approx(math.log(2))
    assert m["behav_vs_prox_max"] == pytest.approx(math.log(2))
    assert m["behav_prox_k3"] == pytest.approx(sum(naive_k3) / 2)
    _, same = offpolicy_pg_loss("none", behav.clone().requires_grad_(), behav, behav,
                                torch.ones(1, 3), mask, 0.2, 0.2, 2.0, log_ratio_clamp=LRC)
    assert same["behav_vs_prox_max"] == 0 and same["behav_prox_k3"] == 0
