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


def test_policy_and_critic_have_no_dropout_in_training_mode(model_dir, tmp_path):  # noqa: F811
    # A hub model with attention dropout, and a critic whose token-classification head
    # transformers gives dropout 0.1: two forwards of the same batch must still agree, or the
    # ratio is not 1 on-policy and GAE is noisy.
    import json
    import shutil

    from asyncrl.learner.model import critic_values, load_critic, load_policy

    path = tmp_path / "dropout"
    shutil.copytree(model_dir, path)
    config = json.loads((path / "config.json").read_text())
    config["attention_dropout"] = 0.3
    (path / "config.json").write_text(json.dumps(config))
    model, tok = load_policy(path)
    critic = load_critic(path)
    model.train()
    critic.train()
    batch = collate(_groups(1), tok.pad_token_id)
    with torch.no_grad():
        for net, fn in ((model, lambda: forward_logprobs(model, batch.input_ids,
                                                         batch.attention_mask, 1.0)[0]),
                        (critic, lambda: critic_values(critic, batch.input_ids,
                                                       batch.attention_mask))):
            assert torch.equal(fn(), fn()), type(net).__name__
