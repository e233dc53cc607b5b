import pytest

from asyncrl.config import ConfigError, RunConfig, load_config, save_config
from tests.conftest import ROOT


def test_default_config_loads_and_validates():
    cfg = load_config("configs/default.yaml")
    assert isinstance(cfg, RunConfig)
    assert cfg.learner.groups_per_step == 16


def test_overrides_are_typed():
    cfg = load_config(None, ["learner.lr=0.5", "generator.group_size=4"])
    assert cfg.learner.lr == 0.5 and cfg.generator.group_size == 4


def test_an_override_with_nothing_after_the_equals_sign_is_the_empty_text():
    """`rm.base=` clears configs/rlhf.yaml's rm.base (OmegaConf alone reads None and refused
    it as "Incompatible value 'None'"); a number field given nothing is refused naming it."""
    assert load_config("configs/rlhf.yaml", ["rm.base="]).rm.base == ""
    with pytest.raises(Exception, match="learner.lr"):
        load_config(None, ["learner.lr="])


@pytest.mark.parametrize("override,needle", [
    ("learner.lrr=1", "learner.lrr"),
    ("learner.lr=fast", "learner.lr"),
    ("nosuchsection.x=1", "nosuchsection"),
])
def test_unknown_or_mistyped_keys_fail_naming_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("learner:\n  totl_steps: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "totl_steps" in str(e.value) and str(p) in str(e.value)


@pytest.mark.parametrize("overrides,needle", [
    (["buffer.max_staleness=0", "weight_sync.interval=2"], "buffer.max_staleness"),
    (["learner.nproc=3", "learner.groups_per_step=16"], "learner.groups_per_step"),
    (["generator.group_size=1"], "generator.group_size"),
    (["weight_sync.backend=mpi"], "weight_sync.backend"),
    (["model.path=/no/such/model"], "model.path"),
])
def test_cross_field_checks_name_the_field(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert needle in str(e.value)


def test_missing_config_file_is_a_clear_error():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.yaml")


def test_hub_model_dir_without_config_json_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        load_config(None, [f"model.path={tmp_path}"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["learner.lr=0.25", "run_dir=/x"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg


def test_admission_limit_is_derived_from_steps_ahead():
    cfg = load_config(None, ["buffer.admit_steps=3", "learner.groups_per_step=8"])
    assert cfg.admit_groups == 24
    cfg = load_config(None, ["buffer.admit_steps=100", "buffer.capacity_groups=40"])
    assert cfg.admit_groups == 40


@pytest.mark.parametrize("overrides, noted", [
    ([], False),
    (["learner.offpolicy=decoupled", "buffer.max_staleness=4", "buffer.admit_steps=4"], True),
    (["learner.offpolicy=decoupled"], True),  # the default bound, 2
    (["learner.offpolicy=tis", "buffer.max_staleness=4", "buffer.admit_steps=4"], False),
    (["learner.offpolicy=decoupled", "buffer.max_staleness=1"], False),
    (["learner.offpolicy=none", "buffer.max_staleness=8", "buffer.admit_steps=8"], False),
])
def test_corrections_that_let_stale_data_drift_get_a_note_naming_the_fields(overrides, noted):
    from asyncrl.config import advisories

    notes = advisories(load_config("configs/default.yaml", overrides))
    assert bool(notes) == noted
    for note in notes:
        assert "learner.offpolicy=" in note and "buffer.max_staleness=" in note
        assert "docs/staleness.md" in note


def test_the_note_names_a_single_update_per_batch_and_a_cap_that_drops_tokens():
    from asyncrl.config import advisories

    base = ["learner.offpolicy=decoupled", "buffer.max_staleness=4", "buffer.admit_steps=4"]
    one = advisories(load_config("configs/default.yaml", base))[0]
    four = advisories(load_config("configs/default.yaml", [*base, "learner.minibatches=4"]))[0]
    assert "never binds" in one and "never binds" not in four
    assert "drops" in one  # the default is_cap, 2
    assert "drops" not in advisories(load_config("configs/default.yaml",
                                                 [*base, "learner.is_cap=5"]))[0]


@pytest.mark.parametrize("override,says", [
    ("sync.interval=2", "sync.interval is now weight_sync.interval"),
    ("sync.backend=gloo", "sync.backend is now weight_sync.backend"),
    ("sync.mode=sync", "sync.mode is now generator.on_policy (sync.mode=sync: "
                       "generator.on_policy=true"),
])
def test_an_old_sync_key_is_refused_naming_the_new_one(override, says):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "default.yaml", [override])
    assert says in str(e.value) and "the overrides" in str(e.value)


def test_an_old_sync_section_in_a_file_is_refused_naming_the_file(tmp_path):
    p = tmp_path / "old.yaml"
    p.write_text("sync:\n  interval: 1\n  mode: async\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "weight_sync.interval" in str(e.value)
    assert "generator.on_policy" in str(e.value)


def test_on_policy_needs_staleness_zero():
    cfg = load_config(ROOT / "configs" / "default.yaml",
                      ["generator.on_policy=true", "buffer.max_staleness=0"])
    assert cfg.generator.on_policy and cfg.weight_sync.interval == 1
    with pytest.raises(ConfigError, match="generator.on_policy=true needs"):
        load_config(ROOT / "configs" / "default.yaml",
                    ["generator.on_policy=true", "buffer.max_staleness=2"])


def test_prefix_caching_on_and_off_survive_yaml_booleans():
    for value, want in (("on", True), ("off", False), ("true", True), ("auto", False)):
        cfg = load_config(ROOT / "configs" / "default.yaml", [f"generator.prefix_caching={value}"])
        assert cfg.prefix_caching is want, value


@pytest.mark.parametrize("override,says", [
    ("run.trackers=[tensorbord]", "run.trackers=['tensorbord']: each one of tensorboard, wandb"),
    ("run.trackers=[wandb,wandb]", "names a tracker twice"),
    ("run.wandb_mode=cloud", "run.wandb_mode='cloud': choose one of auto, online, offline"),
    ("generator.prefix_caching=sometimes", "generator.prefix_caching='sometimes': choose auto"),
])
def test_a_bad_tracker_or_cache_setting_is_refused_naming_it(override, says):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "default.yaml", [override])
    assert says in str(e.value)
