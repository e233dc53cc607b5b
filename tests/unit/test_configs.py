"""Every shipped config loads (unknown keys would fail) with its variant names valid."""

import pytest

from asyncrl.config import load_config
from tests.conftest import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_loads(path, tmp_path):
    overrides = []
    if path.name == "gpu-math.yaml":  # points at a GPU machine's disks: stand-ins here
        (tmp_path / "config.json").write_text("{}")
        (tmp_path / "train.jsonl").write_text('{"question": "1+1?", "answer": "2"}\n')
        overrides = [f"model.path={tmp_path}", f"task.path={tmp_path / 'train.jsonl'}"]
    cfg = load_config(path, overrides)
    assert cfg.learner.total_steps > 0


def test_algorithm_configs_choose_what_they_say():
    dapo = load_config(ROOT / "configs" / "dapo.yaml")
    assert dapo.learner.dynamic_sampling and dapo.learner.clip_high > dapo.learner.clip_low
    assert dapo.learner.offpolicy == "decoupled"
    ppo = load_config(ROOT / "configs" / "ppo.yaml")
    assert ppo.learner.advantage == "gae" and ppo.learner.kl_coef > 0
