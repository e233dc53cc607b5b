"""Every shipped config loads (unknown keys would fail) with its variant names valid."""

import pytest

from asyncrl.config import ConfigError, load_config
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


def test_config_variant_names_equal_the_algo_tables():
    from asyncrl import config
    from asyncrl.algo.advantages import ADVANTAGE_ESTIMATORS
    from asyncrl.algo.kl import KL_ESTIMATORS
    from asyncrl.algo.losses import LOSS_NORMALISERS
    from asyncrl.algo.offpolicy import OFFPOLICY_CORRECTIONS

    assert set(config.ADVANTAGES) == {*ADVANTAGE_ESTIMATORS, "gae"}
    assert set(config.OFFPOLICY) == set(OFFPOLICY_CORRECTIONS)
    assert set(config.LOSS_AGG) == set(LOSS_NORMALISERS)
    assert set(config.KL_ESTIMATORS) == set(KL_ESTIMATORS)


def test_loading_a_config_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from asyncrl.config import load_config; "
            "load_config('configs/dapo.yaml'); import asyncrl.buffer.main; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_a_switch_takes_true_false_0_or_1_not_any_integer():
    # OmegaConf alone turns every integer into a bool (-1 and 99 were true)
    for v in ("-1", "2", "99999999999", '"-1"'):
        with pytest.raises(ConfigError, match=r"eval_engine=-?\d+: must be true or false"):
            load_config(None, [f"generator.eval_engine={v}"])
    with pytest.raises(ConfigError, match="buffer.durable=7"):
        load_config(None, ["buffer.durable=7"])
    assert load_config(None, ["generator.eval_engine=1"]).generator.eval_engine is True
    assert load_config(None, ["generator.streaming=0"]).generator.streaming is False
    assert load_config(None, ["net.curve=false"]).net.curve is False
