"""train_step's proximal logprobs: with one update per batch they come from the update's own
forward pass; they must equal a separate forward of the policy before the update."""

import torch

from asyncrl.learner.batch import collate
from asyncrl.learner.model import forward_logprobs
from asyncrl.learner.step import train_step
from tests.unit.test_checkpoint import _cfg, _groups, _learner, model_dir  # noqa: F401


def test_single_update_proximal_logprobs_are_the_policy_before_the_update(model_dir):  # noqa: F811
    cfg = _cfg(model_dir)
    cfg.learner.advantage, cfg.learner.kl_coef, cfg.learner.minibatches = "grpo", 0.0, 1
    cfg.learner.offpolicy = "decoupled"  # uses prox in the loss, not only in metrics
    model, tok, models, _ = _learner(cfg, model_dir)
    batch = collate(_groups(0), tok.pad_token_id)
    with torch.no_grad():
        before, _ = forward_logprobs(model, batch.input_ids, batch.attention_mask, 1.0)
    m = batch.completion_mask.bool()
    want = (before - batch.behav_logprobs).abs()[m].mean().item()
    stats = train_step(models, batch, cfg.learner, 1.0, 6)
    assert abs(stats["behav_vs_prox"] - want) < 1e-6
    assert stats["prox_vs_current"] == 0.0
