"""Helpers shared by the learner's unit tests: a tiny random model, fabricated trajectory
groups, and a learner built the way learner/main.py builds it."""

from pathlib import Path

import numpy as np
import torch

from asyncrl.config import RunConfig
from asyncrl.learner.main import _build_models
from asyncrl.learner.model import load_policy
from asyncrl.learner.step import warmup_schedule
from asyncrl.wire import Completion, TrajectoryGroup


def build_tiny_model(out: Path) -> Path:
    """The built-in tiny Llama's shape with random weights, and its tokenizer, saved in out."""
    from transformers import AutoTokenizer

    from asyncrl.task.tiny_model import build_model, build_tokenizer

    build_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(out)
    build_model(len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id,
                seed=0).save_pretrained(out)
    return out


def make_groups(seed: int, n: int = 2, size: int = 4) -> list[TrajectoryGroup]:
    rng = np.random.default_rng(seed)
    out = []
    for g in range(n):
        comps = [Completion(rng.integers(3, 60, rng.integers(1, 6)).astype(np.int32), None,
                            float(rng.integers(0, 2)), "stop") for _ in range(size)]
        for c in comps:
            c.logprobs = rng.uniform(-3, -0.1, len(c.tokens)).astype(np.float32)
        out.append(TrajectoryGroup(g, rng.integers(3, 60, 5).astype(np.int32), 0, comps,
                                   "gen0", float(seed)))
    return out


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
