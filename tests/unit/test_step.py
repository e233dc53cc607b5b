"""train_step's proximal logprobs: with one update per batch they come from the update's own
forward pass; they must equal a separate forward of the policy before the update."""

import math

import pytest
import torch

from asyncrl.learner.batch import collate
from asyncrl.learner.model import forward_logprobs
from asyncrl.learner.step import train_step
from tests.helpers.learner import learner_cfg, make_groups, make_learner


def test_single_update_proximal_logprobs_are_the_policy_before_the_update(model_dir):
    cfg = learner_cfg(model_dir)
    cfg.learner.advantage, cfg.learner.kl_coef, cfg.learner.minibatches = "grpo", 0.0, 1
    cfg.learner.offpolicy = "decoupled"  # uses prox in the loss, not only in metrics
    model, tok, models, _ = make_learner(cfg, model_dir)
    batch = collate(make_groups(0), tok.pad_token_id)
    with torch.no_grad():
        before, _ = forward_logprobs(model, batch.input_ids, batch.attention_mask, 1.0)
    m = batch.completion_mask.bool()
    want = (before - batch.behav_logprobs).abs()[m].mean().item()
    stats = train_step(models, batch, cfg.learner, 1.0, 6)
    assert abs(stats["behav_vs_prox"] - want) < 1e-6
    assert stats["prox_vs_current"] == 0.0


def test_the_updates_after_the_first_report_how_far_they_moved_from_the_proximal_policy(
        model_dir):
    """The first update's ratio to the proximal policy is 1 by construction, so its clipfrac
    says nothing about the clip of decoupled PPO; the later ones' mean does."""
    cfg = learner_cfg(model_dir)
    cfg.learner.advantage, cfg.learner.kl_coef, cfg.learner.offpolicy = "grpo", 0.0, "decoupled"
    cfg.learner.minibatches, cfg.learner.lr, cfg.learner.warmup_steps = 2, 1e-2, 0
    _, tok, models, _ = make_learner(cfg, model_dir)
    stats = train_step(models, collate(make_groups(0), tok.pad_token_id), cfg.learner, 1.0, 6)
    assert stats["prox_vs_current"] == 0.0 and stats["clipfrac"] == 0.0  # the first update
    assert stats["prox_vs_current_later"] > 0.0  # the second saw the first's move
    assert 0.0 <= stats["clipfrac_later"] <= 1.0
    cfg.learner.minibatches = 1
    _, tok, models, _ = make_learner(cfg, model_dir)
    stats = train_step(models, collate(make_groups(0), tok.pad_token_id), cfg.learner, 1.0, 6)
    assert "clipfrac_later" not in stats and "prox_vs_current_later" not in stats


def test_policy_and_critic_have_no_dropout_in_training_mode(model_dir, tmp_path):
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
    batch = collate(make_groups(1), tok.pad_token_id)
    with torch.no_grad():
        for net, fn in ((model, lambda: forward_logprobs(model, batch.input_ids,
                                                         batch.attention_mask, 1.0)[0]),
                        (critic, lambda: critic_values(critic, batch.input_ids,
                                                       batch.attention_mask))):
            assert torch.equal(fn(), fn()), type(net).__name__


@pytest.mark.parametrize("kl_mode", ["loss", "reward"])
def test_clamps_reach_the_rl_math_from_the_learner_config(model_dir, monkeypatch, kl_mode):
    import asyncrl.learner.step as step

    cfg = learner_cfg(model_dir)
    lc = cfg.learner
    lc.advantage, lc.offpolicy, lc.minibatches, lc.kl_mode = "grpo", "none", 1, kl_mode
    lc.log_ratio_clamp, lc.kl_clamp = 0.01, 3.25
    model, tok, models, _ = make_learner(cfg, model_dir)
    seen = []
    for fn in ("kl_loss", "kl_reward_penalty"):
        real = getattr(step, fn)

        def spy(*args, _real=real, **kwargs):
            seen.append(kwargs["kl_clamp"])
            return _real(*args, **kwargs)

        monkeypatch.setattr(step, fn, spy)
    stats = train_step(models, collate(make_groups(2), tok.pad_token_id), lc, 1.0, 6)
    assert seen == [3.25]
    # The generator's logprobs here are random, far from the tiny model's (unclamped, the ratios
    # span 0.004 to 0.065): clamped, they lie within exp(+-0.01), and some sit on the bound.
    bound = math.exp(0.01)
    assert 1 / bound - 1e-6 <= stats["ratio_min"] <= stats["ratio_max"] <= bound + 1e-6
    assert max(stats["ratio_max"], 1 / stats["ratio_min"]) == pytest.approx(bound)


def test_bf16_training_keeps_float32_master_weights_and_moves_them_like_float32(model_dir):
    """model.dtype=bfloat16: float32 master weights, forwards under bf16 autocast. The update
    of a few steps matches float32 training within bf16's tolerance, and at a small learning
    rate nearly every weight still moves (trained in bf16 directly most updates are below
    bf16's resolution)."""
    from asyncrl.learner.main import compute_context
    from asyncrl.learner.runlog import weights_sha256

    deltas = {}
    for dtype in ("float32", "bfloat16"):
        cfg = learner_cfg(model_dir)
        cfg.learner.advantage, cfg.learner.kl_coef, cfg.learner.warmup_steps = "grpo", 0.0, 0
        cfg.learner.lr, cfg.model.dtype = 1e-4, dtype
        model, tok, models, _ = make_learner(cfg, model_dir)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for step in range(3):
            with compute_context(dtype, torch.device("cpu")):
                train_step(models, collate(make_groups(step), tok.pad_token_id), cfg.learner, 1.0, 6)
        deltas[dtype] = torch.cat([(p.detach() - before[n]).flatten()
                                   for n, p in model.named_parameters()])
        assert len(weights_sha256(model)) == 64
    d32, d16 = deltas["float32"], deltas["bfloat16"]
    moved = (d16 != 0).float().mean().item()
    assert moved > 0.9, moved
    cos = torch.nn.functional.cosine_similarity(d32, d16, dim=0).item()
    assert cos > 0.95, cos  # the same update direction, within bf16's forward rounding
    assert (d16.norm() / d32.norm()).item() == pytest.approx(1.0, rel=0.1)


def test_checksum_works_for_every_dtype():
    from asyncrl.learner.runlog import weights_sha256

    sums = set()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        lin = torch.nn.Linear(3, 2).to(dtype)
        sums.add(weights_sha256(lin))
    assert len(sums) == 3  # one per dtype, none raising (numpy has no bfloat16)


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean", "constant"])
def test_the_entropy_term_aggregates_with_the_configured_normaliser(model_dir, loss_agg):
    from asyncrl.algo.losses import LOSS_NORMALISERS

    cfg = learner_cfg(model_dir)
    cfg.learner.advantage, cfg.learner.kl_coef, cfg.learner.minibatches = "grpo", 0.0, 1
    cfg.learner.entropy_coef, cfg.learner.loss_agg = 0.01, loss_agg
    model, tok, models, _ = make_learner(cfg, model_dir)
    batch = collate(make_groups(3), tok.pad_token_id)
    with torch.no_grad():
        _, entropy = forward_logprobs(model, batch.input_ids, batch.attention_mask, 1.0,
                                      with_entropy=True)
    m = batch.completion_mask
    normaliser = LOSS_NORMALISERS[loss_agg](m, 6)
    # naive: per completion, then the normaliser's way of putting them together
    if loss_agg == "seq_mean":
        want = -sum((entropy[b] * m[b]).sum() / m[b].sum() for b in range(m.shape[0])) / m.shape[0]
    else:
        want = -(entropy * m).sum() / float(normaliser if loss_agg == "constant" else m.sum())
    stats = train_step(models, batch, cfg.learner, 1.0, 6)
    assert stats["entropy_loss"] == pytest.approx(float(want), rel=1e-5)
    assert stats["entropy"] == pytest.approx(float((entropy * m).sum() / m.sum()), rel=1e-5)


def test_learner_adam_eps_reaches_the_policy_and_critic_optimizers(model_dir):
    cfg = learner_cfg(model_dir)  # advantage=gae: the critic has an optimizer too
    cfg.learner.adam_eps = 1e-5
    _, _, models, _ = make_learner(cfg, model_dir)
    assert [g["eps"] for g in models.policy_opt.param_groups] == [1e-5]
    assert [g["eps"] for g in models.critic_opt.param_groups] == [1e-5]


@pytest.mark.parametrize("advantage", ["grpo", "gae"])
def test_a_separate_sample_takes_its_episodes_reward_and_advantage(model_dir, advantage):
    """An agent's episode split into separate samples (wire.Completion.sample_of): the extra
    row trains with its episode's reward (GAE's terminal reward) and advantage (GRPO's), and
    the group's advantages are those of its own completions alone."""
    import copy

    from asyncrl.learner.step import advantages

    cfg = learner_cfg(model_dir)
    cfg.learner.advantage, cfg.learner.kl_coef = advantage, 0.0
    _, tok, models, _ = make_learner(cfg, model_dir)
    groups = make_groups(3)
    plain = collate(copy.deepcopy(groups), tok.pad_token_id)
    extra = copy.deepcopy(groups[1].completions[2])
    extra.sample_of = 2
    groups[1].completions.append(extra)
    batch = collate(groups, tok.pad_token_id)
    B = plain.input_ids.shape[0]
    assert batch.input_ids.shape[0] == B + 1 and batch.rewards.tolist() == plain.rewards.tolist()
    assert batch.row_episode.tolist() == [*range(B), 4 + 2]
    with torch.no_grad():
        a = advantages(models, batch, batch.rewards, batch.completion_mask, None, None,
                       cfg.learner, None)
        p = advantages(models, plain, plain.rewards, plain.completion_mask, None, None,
                       cfg.learner, None)
    m = batch.completion_mask.bool()
    if advantage == "grpo":
        assert torch.equal(a.adv[:B], p.adv) and a.adv[B] == a.adv[6]
    else:  # the copy's last token's return is its episode's reward, as the original's is
        last = [int(torch.nonzero(m[i]).max()) for i in (6, B)]
        assert a.returns[B, last[1]] == a.returns[6, last[0]] == batch.rewards[1, 2]
    stats = train_step(models, batch, cfg.learner, 1.0, 6)
    assert math.isfinite(stats["loss"])


def test_lr_anneal_decays_the_learning_rate_linearly_to_zero_after_the_warm_up():
    from asyncrl.config import load_config
    from asyncrl.learner.step import warmup_schedule

    def lrs(anneal_steps):
        opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
        sched, out = warmup_schedule(opt, 10, anneal_steps), []
        for _ in range(60):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    constant, annealed = lrs(0), lrs(60)
    assert constant[9:] == [1.0] * 51  # warm-up, then constant (learner.lr_anneal=false)
    assert annealed[0] == constant[0] == 0.1
    assert all(a > b for a, b in zip(annealed[9:], annealed[10:]))  # decays after the warm-up
    assert annealed[-1] == pytest.approx(1 / 60) and annealed[30] == pytest.approx(0.5)
    assert not load_config(None, []).learner.lr_anneal
    assert load_config("configs/rlhf.yaml", []).learner.lr_anneal
