"""Multi-turn episodes on the real vLLM engine, with the calculator environment and the
embedded default's model and byte-level tokenizer, the prefix cache on and salted by version:
in 3-turn episodes whose turns are aborted and resubmitted mid-turn (abort mode), the
learner's logprobs of the sampled tokens equal the
behaviour logprobs within 1e-4, the ids it trains on are exactly those the engine saw, and
the gradient of the training loss reaches no position that predicts an injected token."""

import time

import pytest
import torch

from asyncrl.config import LearnerConfig, load_config
from asyncrl.env import EnvSpec
from asyncrl.env.calculator import Calculator
from asyncrl.generator.episode import INJECTED, SAMPLED, Budgets, EpisodeGroup
from asyncrl.generator.stream import Rollout
from asyncrl.learner.batch import collate
from tests.conftest import ROOT
from tests.helpers.learner import learner_vs_engine

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def setup(model_cache):
    from transformers import AutoTokenizer

    from asyncrl.generator.engine import VLLMEngine, configure_cpu_env
    from asyncrl.generator.episode import episode_codec
    from asyncrl.runner import resolve_model
    from asyncrl.task import load_task

    cfg = resolve_model(load_config(ROOT / "configs" / "default.yaml",
                                    [f"warm_start.cache_dir={model_cache}", "env.name=calculator",
                                     "generator.max_tokens=6", "generator.max_turns=3"]),
                        lambda _: None)
    configure_cpu_env(1, 1)
    # The prefix cache on, as episodes run (generator.prefix_caching=auto), salted by version.
    engine = VLLMEngine(cfg.model.path, "float32", 0, 128, 0.85, prefix_caching=True,
                        block_size=32)
    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    train, _ = load_task(cfg.task)
    return cfg, engine, tok, episode_codec(cfg, tok), train


def _episodes(setup, n_groups=2, abort_every=3):
    cfg, engine, tok, codec, train = setup
    r = Rollout(engine, 16, "abort", clock=time.monotonic, salt_versions=True)
    budgets = Budgets(3, 6, 120, 16, 30.0)
    units = [r.start(EpisodeGroup(p.id, [p, p], EnvSpec(Calculator), codec, budgets, 1.0, 0,
                                  0.0)) for p in train[:n_groups]]
    done, steps, aborts = [], 0, 0
    while len(done) < n_groups:
        r.step(0)
        steps += 1
        if steps % abort_every == 0 and r.running:  # an "update" to the same weights
            r.before_update(0)
            r.after_update()
            aborts += 1
        done += r.take_finished()
        assert steps < 5000
    assert {id(u) for u in done} == {id(u) for u in units}
    return [u.trajectory("gen0") for u in done], aborts, r.cached_tokens


def test_three_turn_episodes_train_on_the_engines_ids_and_logprobs(setup):
    cfg, _, tok, codec, _ = setup
    groups, aborts, cached = _episodes(setup)
    assert aborts > 0  # turns were aborted and resubmitted with their tokens so far
    assert cached > 0  # some turns' prompts came from the prefix cache
    for g in groups:
        for c in g.completions:
            assert c.finish_reason in ("max_turns", "stop", "length"), c.finish_reason
            assert (c.sources == INJECTED).any() and (c.sources == SAMPLED).any()
    # Exactly 3 model turns in the longest: the untrained model never answers.
    assert any(c.finish_reason == "max_turns" for g in groups for c in g.completions)
    batch = collate(groups, tok.pad_token_id)
    diff = learner_vs_engine(cfg.model.path, batch)
    assert diff < 1e-4, diff
    # The rows are the episodes' ids as sampled and injected, never re-encoded.
    row = 0
    for g in groups:
        for c in g.completions:
            P = len(g.prompt_tokens)
            ids = batch.input_ids[row, P:P + len(c.tokens)].tolist()
            assert ids == c.tokens.tolist()
            row += 1


def test_the_loss_gradient_reaches_no_injected_token(setup, monkeypatch):
    from asyncrl.learner import step as step_mod
    from asyncrl.learner.model import load_policy
    from asyncrl.learner.step import Models, train_step

    cfg, _, tok, _, _ = setup
    groups, _, _ = _episodes(setup, n_groups=2, abort_every=1000)
    for g, reward in zip(groups, (1.0, 0.0)):  # rewards that differ within each group
        g.completions[0].reward, g.completions[1].reward = reward, 1.0 - reward
    batch = collate(groups, tok.pad_token_id)
    kept = []
    real = step_mod.forward_logprobs

    def keep_grad(*args, **kwargs):
        out = real(*args, **kwargs)
        if out[0].requires_grad:
            out[0].retain_grad()
            kept.append(out[0])
        return out

    monkeypatch.setattr(step_mod, "forward_logprobs", keep_grad)
    model, _ = load_policy(cfg.model.path, "float32")
    models = Models(model, torch.optim.AdamW(model.parameters(), lr=1e-5))
    train_step(models, batch, LearnerConfig(pack_row_tokens=0), 1.0, 120)
    (lp,) = kept
    grad = lp.grad
    completion = torch.zeros_like(batch.completion_mask, dtype=torch.bool)
    row = 0
    for g in groups:
        for c in g.completions:
            P = len(g.prompt_tokens)
            injected = torch.from_numpy(c.sources == INJECTED)
            completion[row, P - 1:P - 1 + len(c.tokens)] = injected
            row += 1
    assert completion.any()
    assert grad[completion].abs().max().item() == 0.0
    assert grad[batch.completion_mask.bool()].abs().max().item() > 0.0


class SlowCalculator(Calculator):
    def step(self, text):
        time.sleep(0.3)  # a window between two turns in which the update lands
        return super().step(text)


def test_an_update_between_two_turns_gives_an_episode_tokens_of_two_versions(setup):
    from asyncrl.generator.episode import SAMPLED

    cfg, engine, tok, codec, train = setup
    r = Rollout(engine, 16, "keep", clock=time.monotonic, salt_versions=False)
    budgets = Budgets(3, 6, 120, 16, 30.0)
    unit = r.start(EpisodeGroup(train[0].id, [train[0]], EnvSpec(SlowCalculator), codec,
                                budgets, 1.0, 0, 0.0), 0)
    version, deadline = 0, time.monotonic() + 120
    while not unit.done:
        ep = unit.episodes[0]
        if version == 0 and ep.turns == 1 and not r.running:  # between turns 1 and 2
            r.before_update(0)
            version = 1
            r.after_update(1)
        r.step(version)
        if not r.running:
            time.sleep(0.01)  # the environment's step is running
        assert time.monotonic() < deadline
    ep = unit.episodes[0]
    sampled = [v for v, s in zip(ep.versions, ep.sources) if s == SAMPLED]
    assert ep.turns >= 2 and set(sampled) == {0, 1}, (ep.turns, sampled)
    first_turn = sampled.index(1)
    assert set(sampled[:first_turn]) == {0} and set(sampled[first_turn:]) == {1}
    assert unit.trajectory("gen0").policy_version == 0
