"""Packed forward passes: the layout keeps every sequence whole and apart, the model's outputs
come back to the padded layout unchanged, and train_step gives the same update either way."""

import copy

import numpy as np
import pytest
import torch

from asyncrl.learner.batch import collate
from asyncrl.learner.model import check_packing, critic_values, forward_logprobs
from asyncrl.learner.packing import pack, pack_if_smaller, sequence_lengths
from asyncrl.learner.step import padding_fraction, train_step
from asyncrl.wire import Completion, TrajectoryGroup
from tests.helpers.learner import learner_cfg, make_learner


def _varied_groups(seed: int, n: int = 4, size: int = 4) -> list[TrajectoryGroup]:
    """Prompts of 3-12 tokens, completions of 1-20: rows of very different lengths."""
    rng = np.random.default_rng(seed)
    out = []
    for g in range(n):
        comps = []
        for _ in range(size):
            tokens = rng.integers(3, 60, rng.integers(1, 21)).astype(np.int32)
            comps.append(Completion(tokens, rng.uniform(-3, -0.1, len(tokens)).astype(np.float32),
                                    float(rng.integers(0, 2)), "stop"))
        out.append(TrajectoryGroup(g, rng.integers(3, 60, rng.integers(3, 13)).astype(np.int32),
                                   0, comps, "gen0", float(seed)))
    return out


def test_every_sequence_is_placed_once_whole_and_apart():
    batch = collate(_varied_groups(1), pad_id=0)
    p = pack(batch.input_ids, batch.attention_mask, row_tokens=40)
    lengths = batch.attention_mask.sum(1).tolist()
    assert p.input_ids.shape[1] == max(40, max(lengths))
    assert p.computed_tokens < batch.input_ids.numel()
    seen = set()
    for i, n in enumerate(lengths):
        cols = p.col[p.seq == i]
        rows = p.row[p.seq == i]
        assert len(cols) == n - 1 and len(set(rows.tolist())) == 1
        r, start = int(rows[0]), int(cols[0])
        assert torch.equal(p.input_ids[r, start:start + n], batch.input_ids[i, :n])
        assert torch.equal(p.position_ids[r, start:start + n], torch.arange(n))
        span = {(r, c) for c in range(start, start + n)}
        assert not span & seen  # no two sequences share a slot
        seen |= span
    # No row is left empty: every packed row holds at least one sequence.
    assert len(set(p.row.tolist())) == p.input_ids.shape[0]


def test_packing_is_used_only_where_it_saves_compute():
    varied = collate(_varied_groups(1), pad_id=0)
    assert pack_if_smaller(varied.input_ids, varied.attention_mask, 48) is not None
    # The default run: 7-token prompts and 3-4 token completions pad ~4% and pack worse.
    rng = np.random.default_rng(0)
    groups = _varied_groups(1)
    for g in groups:
        g.prompt_tokens = rng.integers(3, 60, 7).astype(np.int32)
        for c in g.completions:
            c.tokens, c.logprobs = c.tokens[:3], c.logprobs[:3]
    even = collate(groups, pad_id=0)
    assert pack_if_smaller(even.input_ids, even.attention_mask, 64) is None
    assert pack_if_smaller(varied.input_ids, varied.attention_mask, 0) is None  # off
    # The padding the learner reports is that of the layout it used.
    real = float(varied.attention_mask.sum())
    packed = pack_if_smaller(varied.input_ids, varied.attention_mask, 48)
    assert padding_fraction(varied, packed) == 1 - real / packed.computed_tokens
    assert padding_fraction(varied, None) == 1 - real / varied.input_ids.numel()
    assert padding_fraction(varied, packed) < padding_fraction(varied, None)


def test_left_padded_rows_are_refused():
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match="right-padded"):
        sequence_lengths(mask)


def test_packed_logprobs_entropy_and_gradients_equal_padded_ones(model_dir):
    cfg = learner_cfg(model_dir)
    model, tok, _, _ = make_learner(cfg, model_dir)
    batch = collate(_varied_groups(2), tok.pad_token_id)
    packing = pack_if_smaller(batch.input_ids, batch.attention_mask, 48)
    assert packing is not None
    m = batch.completion_mask
    out = {}
    for rows, layout in ((0, None), (48, packing)):
        model.zero_grad()
        lp, ent = forward_logprobs(model, batch.input_ids, batch.attention_mask, 0.7,
                                   with_entropy=True, packing=layout)
        ((lp + 0.1 * ent) * m).sum().backward()
        grads = torch.cat([q.grad.flatten() for q in model.parameters() if q.grad is not None])
        out[rows] = (lp.detach() * m, ent.detach() * m, grads)
    for a, b in zip(out[0], out[48], strict=True):
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-4), float((a - b).abs().max())


def test_packed_critic_values_equal_padded_ones(model_dir):
    cfg = learner_cfg(model_dir)
    _, tok, models, _ = make_learner(cfg, model_dir)
    batch = collate(_varied_groups(3), tok.pad_token_id)
    packing = pack_if_smaller(batch.input_ids, batch.attention_mask, 48)
    assert packing is not None
    with torch.no_grad():
        padded = critic_values(models.critic, batch.input_ids, batch.attention_mask)
        packed = critic_values(models.critic, batch.input_ids, batch.attention_mask, packing)
    inside = batch.attention_mask[:, 1:].bool()  # every position that predicts a token
    assert torch.allclose(padded[inside], packed[inside], atol=2e-5)
    assert (packed[~inside] == 0).all()


@pytest.mark.parametrize("setup", ["gae_kl_minibatches", "grpo_entropy_seq_mean", "decoupled"])
def test_train_step_packed_gives_the_padded_update(model_dir, setup):
    cfg = learner_cfg(model_dir)  # gae + critic, KL to the reference, 2 minibatches
    lc = cfg.learner
    if setup == "grpo_entropy_seq_mean":
        lc.advantage, lc.entropy_coef, lc.loss_agg, lc.kl_coef = "grpo", 0.01, "seq_mean", 0.0
        lc.minibatches = 1
    elif setup == "decoupled":
        lc.advantage, lc.offpolicy, lc.kl_coef, lc.kl_mode = "grpo", "decoupled", 0.05, "reward"
    runs = {}
    for rows in (0, 64):
        lc.pack_row_tokens = rows
        model, tok, models, sched = make_learner(cfg, model_dir)
        stats = []
        for step in range(1, 3):
            stats.append(train_step(models, collate(_varied_groups(10 + step), tok.pad_token_id),
                                    lc, 1.0, 20))
            sched.step()
        runs[rows] = (copy.deepcopy(model.state_dict()), stats)
    (w0, s0), (w1, s1) = runs[0], runs[64]
    for a, b in zip(s0, s1, strict=True):
        assert a.keys() == b.keys()
        assert b.pop("padding_fraction") < a.pop("padding_fraction") / 2  # the point of it
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-3, abs=1e-4), k
    worst = max(float((w0[k] - w1[k]).abs().max()) for k in w0)
    assert worst < 1e-4, worst


def test_a_model_that_mixes_packed_sequences_is_stopped_naming_the_setting(model_dir):
    cfg = learner_cfg(model_dir)
    model, tok, _, _ = make_learner(cfg, model_dir)
    batch = collate(_varied_groups(4), tok.pad_token_id)
    args = (batch.input_ids, batch.attention_mask, batch.completion_mask, 64)
    assert check_packing(model, *args) < 1e-4

    class IgnoresPositions(torch.nn.Module):  # causal attention over the whole packed row
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    with pytest.raises(RuntimeError, match="set learner.pack_row_tokens=0"):
        check_packing(IgnoresPositions(model), *args)
