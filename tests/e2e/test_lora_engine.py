"""model.lora in the real vLLM engine: each version's adapter is its own LoRA; a request runs
on the adapter of the version it started under to its end (keep mode), so its tokens carry that
version and its logprobs equal the learner's under that adapter within 1e-4; a new request
after the push runs on the new adapter; an adapter nobody uses any more is removed with its
files."""

import pytest
import torch

from asyncrl import lora
from asyncrl.config import load_config
from asyncrl.generator.stream import Rollout, SampleGroup
from asyncrl.learner.model import load_policy, token_logprobs
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

TOL = 1e-4
TEMPERATURE = 2.0  # long completions: the push lands while they run
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = [1, 20, 21, 14, 22, 23, 30]


@pytest.fixture(scope="module")
def base_dir(model_cache):
    from asyncrl.runner import resolve_model

    cfg = resolve_model(load_config(ROOT / "configs" / "default.yaml",
                                    [f"warm_start.cache_dir={model_cache}"]), lambda _: None)
    return cfg.model.path


def _adapted(base_dir, seed):
    model, _ = load_policy(base_dir)
    lora.apply(model, 8, 16.0, 0.0, TARGETS)
    torch.manual_seed(seed)
    for m in lora.layers(model):
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    return model.eval()


def _write(model, path):
    return lora.save_adapter(path, lora.config_of(model),
                             lora.adapter_tensors(model.state_dict().items()))


def _diff(model, seq):
    ids = torch.tensor([seq.prompt + seq.tokens])
    with torch.no_grad():
        lp = token_logprobs(model, ids, torch.ones_like(ids), TEMPERATURE)[0]
    return (lp[len(seq.prompt) - 1:] - torch.tensor(seq.logprobs)).abs().max().item()


def test_a_push_mid_generation_leaves_running_requests_on_their_adapter(base_dir, tmp_path):
    from asyncrl.generator.engine import VLLMEngine, configure_cpu_env

    configure_cpu_env(1, 1)
    engine = VLLMEngine(base_dir, "float32", 0, 64, 0.85, lora_rank=8, max_loras=3,
                        adapter_dir=tmp_path / "adapters")
    v1, v2 = _adapted(base_dir, 1), _adapted(base_dir, 2)
    engine.adapters.add(1, _write(v1, engine.adapters.path(1)))

    rollout = Rollout(engine, 64, "keep", lambda: 0.0, adapters=True)
    old = rollout.start(SampleGroup("a", PROMPT, 1, 8, TEMPERATURE, 24, 0.0), version=1)
    for _ in range(3):
        rollout.step(1)
    assert rollout.running, "every sequence finished before the push"
    # The push of version 2 lands between two engine steps.
    rollout.before_update(1)
    engine.adapters.add(2, _write(v2, engine.adapters.path(2)))
    rollout.after_update(2)
    assert rollout.updates_in_flight == 1
    new = rollout.start(SampleGroup("b", PROMPT, 2, 8, TEMPERATURE, 24, 0.0), version=2)
    assert set(engine.adapters.loaded) == {1, 2}  # v1 still runs
    while rollout.busy:
        rollout.step(2)
    spanned = [s for s in old.seqs if len(s.tokens) > 3]  # sampled after the push too
    assert spanned
    for s in old.seqs:
        assert set(s.versions) == {1}  # every token, before and after the push
        assert _diff(v1, s) < TOL
    for s in new.seqs:
        assert set(s.versions) == {2}
        assert _diff(v2, s) < TOL
    # The adapters really differ: v2's tokens are not v1's logprobs.
    assert max(_diff(v1, s) for s in new.seqs) > 1e-2
    # Nothing runs on v1 any more: removed, files too.
    assert set(engine.adapters.loaded) == {2}
    assert not engine.adapters.path(1).exists() and engine.adapters.path(2).is_dir()

    # Abort mode: the running requests are resubmitted on the new adapter, prefix included.
    engine.adapters.add(3, _write(v1, engine.adapters.path(3)))
    rollout = Rollout(engine, 64, "abort", lambda: 0.0, adapters=True)
    group = rollout.start(SampleGroup("c", PROMPT, 3, 8, TEMPERATURE, 24, 0.0), version=3)
    for _ in range(3):
        rollout.step(3)
    rollout.before_update(3)
    engine.adapters.add(4, _write(v2, engine.adapters.path(4)))
    rollout.after_update(4)
    while rollout.busy:
        rollout.step(4)
    two = [s for s in group.seqs if set(s.versions) == {3, 4}]
    assert two, "no sequence spans the push"
    for s in two:
        cut = s.versions.index(4)
        ids = torch.tensor([s.prompt + s.tokens])
        with torch.no_grad():
            lp = token_logprobs(v2, ids, torch.ones_like(ids), TEMPERATURE)[0]
        after = lp[len(s.prompt) - 1 + cut:]
        assert (after - torch.tensor(s.logprobs[cut:])).abs().max().item() < TOL
    assert set(engine.adapters.loaded) == {4}
