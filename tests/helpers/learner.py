"""Helpers shared by the learner's unit tests: the tiny random model (asyncrl.testing's),
fabricated trajectory groups, and a learner built the way learner/main.py builds it."""

import torch

from asyncrl import testing
from asyncrl.config import RunConfig
from asyncrl.learner.main import _build_models
from asyncrl.learner.model import load_policy
from asyncrl.learner.step import warmup_schedule
from asyncrl.testing import build_tiny_model as build_tiny_model
from asyncrl.wire import TrajectoryGroup


def make_groups(seed: int, n: int = 2, size: int = 4) -> list[TrajectoryGroup]:
    """n groups of `size` completions of 1 to 5 tokens after prompts of 5, ids in [3, 60),
    random behaviour logprobs and 0/1 rewards, all drawn from `seed`; created_at is the seed
    (the batch log's tests tell the steps apart by it)."""
    return testing.make_groups(n, size, rng=seed, vocab_size=60, min_token=3, prompt_len=5,
                               completion_len=(1, 5), finish_reason="stop",
                               created_at=float(seed))


def learner_cfg(model_dir) -> RunConfig:
    cfg = RunConfig()
    cfg.model.path = str(model_dir)
    # Everything a checkpoint must carry: Adam moments, warm-up schedule, critic and its
    # optimizer, the reference model for KL (reloaded from model.path, not the checkpoint).
    cfg.learner.advantage, cfg.learner.kl_coef, cfg.learner.warmup_steps = "gae", 0.05, 3
    cfg.learner.minibatches = 2
    return cfg


def make_learner(cfg, path):
    torch.manual_seed(0)
    model, tok = load_policy(path)
    model.train()
    models = _build_models(cfg, model, torch.device("cpu"), world=1)
    return model, tok, models, warmup_schedule(models.policy_opt, cfg.learner.warmup_steps)


def learner_vs_engine(model_path, batch) -> float:
    """The largest |learner logprob - behaviour logprob| over a batch's sampled tokens: the
    policy at model_path in float32, temperature 1, against what the engine recorded."""
    from asyncrl.learner.model import token_logprobs

    model, _ = load_policy(model_path, "float32")
    with torch.no_grad():
        lp = token_logprobs(model, batch.input_ids, batch.attention_mask, 1.0)
    return (lp - batch.behav_logprobs)[batch.completion_mask.bool()].abs().max().item()
