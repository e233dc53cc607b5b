"""The real vLLM engine's request-level loop as the streaming generator drives it: requests
added while others run, outputs collected step by step, abort, and a blocking generate (the
sync probe) in the middle that loses none of the other requests' tokens."""

import pytest

from asyncrl.config import load_config
from asyncrl.generator.stream import Rollout, SampleGroup
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def engine(model_cache):
    from asyncrl.generator.engine import VLLMEngine, configure_cpu_env
    from asyncrl.runner import resolve_model

    cfg = resolve_model(load_config(ROOT / "configs" / "default.yaml",
                                    [f"warm_start.cache_dir={model_cache}"]), lambda _: None)
    configure_cpu_env(1, 1)
    return VLLMEngine(cfg.model.path, "float32", 0, 64, 0.85)


PROMPT = [1, 20, 21, 14, 22, 23, 30]


def test_requests_added_while_others_run_all_finish_with_their_logprobs(engine):
    s = Rollout(engine, max_inflight=8, inflight_update="keep", clock=lambda: 0.0)
    s.start(SampleGroup("A", PROMPT, 0, 4, 1.0, 12, 0.0))
    s.step(0)
    s.step(0)
    s.start(SampleGroup("B", PROMPT, 0, 4, 1.0, 12, 0.0))  # continuous batching: B joins A
    probe = engine.generate([PROMPT], 1, 1.0, 6, seed=0)[0][0]  # steps A and B too
    assert 1 <= len(probe.tokens) <= 6 and len(probe.logprobs) == len(probe.tokens)
    back = []
    while s.busy:
        s.step(1)
        back += s.take_finished()
    assert [g.key for g in back] == ["A", "B"]
    for g in back:
        for seq in g.seqs:
            assert 1 <= len(seq.tokens) <= 12
            assert len(seq.logprobs) == len(seq.versions) == len(seq.tokens)
            assert all(lp <= 0 for lp in seq.logprobs)
            assert seq.finish_reason in ("stop", "length")
    # A's first two steps ran before the "update" to version 1, the rest after.
    assert back[0].seqs[0].versions[:2] == [0, 0]


def test_abort_mode_continues_every_sequence_to_its_full_length(engine):
    s = Rollout(engine, max_inflight=8, inflight_update="abort", clock=lambda: 0.0)
    s.start(SampleGroup("A", PROMPT, 0, 2, 1.0, 12, 0.0))
    s.step(0)
    s.step(0)
    before = [list(seq.tokens) for seq in s.units[0].seqs]
    s.before_update(0)
    assert not engine.has_unfinished()
    s.after_update()
    back = []
    while s.busy:
        s.step(1)
        back += s.take_finished()
    for seq, prefix in zip(back[0].seqs, before):
        assert seq.tokens[: len(prefix)] == prefix  # kept what was sampled before the abort
        assert set(seq.versions[len(prefix):]) <= {1}
