import math

import pytest
import torch

from asyncrl.algo.losses import ppo_clip_loss
from asyncrl.algo.offpolicy import OFFPOLICY_CORRECTIONS, importance_ess, offpolicy_pg_loss

PARAMS = {"is_cap": 2.0, "is_low": 0.5, "is_high": 2.0}


def test_dict_names():
    assert set(OFFPOLICY_CORRECTIONS) == {"none", "decoupled", "tis", "icepop", "seq_mask"}
    with pytest.raises(ValueError, match="seq_mask"):
        offpolicy_pg_loss("ppo", torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1),
                          torch.ones(1, 1), torch.ones(1, 1), 0.2, 0.2, 1.0)
    with pytest.raises(ValueError, match="is_cap"):
        offpolicy_pg_loss("tis", torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1),
                          torch.ones(1, 1), torch.ones(1, 1), 0.2, 0.2, 1.0)


@pytest.mark.parametrize("name", sorted(OFFPOLICY_CORRECTIONS))
def test_on_fresh_data_every_correction_is_plain_ppo(name):
    torch.manual_seed(0)
    B, T = 4, 6
    behav = -torch.rand(B, T) * 3
    adv = torch.randn(B, 1)
    mask = (torch.rand(B, T) > 0.2).float()
    logp = behav.clone().requires_grad_()
    loss, m = offpolicy_pg_loss(name, logp, behav.clone(), behav.clone(), adv, mask, 0.2, 0.28,
                                float(mask.sum()), **PARAMS)
    ref_logp = behav.clone().requires_grad_()
    want, _ = ppo_clip_loss(ref_logp, behav, adv, mask, 0.2, 0.28, float(mask.sum()))
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
    loss, m = offpolicy_pg_loss(name, logp, prox, behav, adv, mask, 0.2, 0.2, 1.0, **params)
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
                                torch.ones(1, 2), 0.2, 0.2, 2.0)
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
    loss, _ = offpolicy_pg_loss("none", prox, prox, behav, adv, mask, 0.2, 0.2, 11.0)
    want, _ = ppo_clip_loss(prox, behav, adv, mask, 0.2, 0.2, 11.0)
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
                                7.0, is_low=0.5, is_high=2.0)
    loss.backward()
    assert torch.all(logp.grad[0] != 0) and torch.all(logp.grad[1] == 0)
    assert m["is_masked_frac"] == pytest.approx(2 / 7)
