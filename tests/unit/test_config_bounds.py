"""Every numeric config field is bounded when the config loads.

The walk finds the fields by introspection from RunConfig, so a field added without an entry
in config.BOUNDS fails here. Each field gets 0, -1 and absurdly large values (and NaN and
+-inf for floats); each must either fail with one ConfigError line naming the field, or be
one of the few values in ACCEPTED, each with the reason it really runs.
"""

import dataclasses
import math
import types
import typing

import pytest

from asyncrl.config import BOUNDS, BUILTIN_MAX_POSITIONS, ConfigError, RunConfig, load_config
from tests.conftest import asyncrl

INT_VALUES = (0, -1, 10**12, 2**63)
FLOAT_VALUES = (0.0, -1.0, 1e30, math.nan, math.inf, -math.inf)

# (field, value) pairs that load, and why each really runs. Exactly these are accepted.
ACCEPTED = {
    ("seed", 0): "any 31-bit seed",
    ("task.seed", 0): "any 31-bit seed",
    ("generator.seed", 0): "any 31-bit seed",
    ("learner.seed", 0): "any 31-bit seed",
    ("model.lora.rank", 0): "LoRA off: the whole model trains (the default)",
    ("model.lora.dropout", 0): "no dropout on the adapters' input (the default)",
    ("task.reward_model_weight", 0): "the reward model's score is ignored (no model by default)",
    ("task.reward_model_weight", -1): "a reward model's score may be a penalty",
    ("task.terms_tail", 0): "reasoning: a uniform number of terms (documented)",
    ("task.carry_slip", 0): "an exact SFT teacher",
    ("task.tool_skip", 0): "a teacher that always calls the tool (the default)",
    ("generator.kv_block_size", 0): "vLLM's own block size (the default)",
    ("generator.agent_episodes", 0): "twice generator.max_inflight (the default)",
    ("warm_start.seed", 0): "any 31-bit seed",
    ("warm_start.seed", -1): "the run's seed (the default)",
    ("warm_start.until_loss", 0): "always warm_start.steps (the default)",
    ("warm_start.slip_steps", 0): "the slipping teacher from the start (the default)",
    ("warm_start.steps", 0): "RL from random init (documented)",
    ("warm_start.min_lr_ratio", 0): "the cosine ends at 0 (the default)",
    ("buffer.max_staleness", 0): "on-policy only (documented)",
    ("learner.warmup_steps", 0): "no warm-up: full lr from the first step",
    ("learner.weight_decay", 0): "no weight decay (the default)",
    ("learner.clip_low", 0): "one-sided clip range [1, 1 + clip_high]",
    ("learner.clip_high", 0): "one-sided clip range [1 - clip_low, 1]",
    ("learner.is_low", 0): "icepop / seq_mask keep every weight below is_high",
    ("learner.clip_c", 0): "dual clip off (documented)",
    ("learner.pack_row_tokens", 0): "always padded (documented)",
    ("learner.entropy_coef", 0): "no entropy bonus (the default)",
    ("learner.kl_coef", 0): "no KL term, no reference model (documented)",
    ("learner.overlong_cache", 0): "no soft overlong punishment (documented)",
    ("learner.gamma", 0): "GAE with only the immediate reward: myopic, valid",
    ("learner.lam", 0): "GAE(0) is the one-step TD advantage",
    ("learner.value_clip", 0): "no value clipping (0: off, as the step passes None)",
    ("learner.max_restarts", 0): "torchrun does not restart ranks; the same command resumes",
    ("learner.logprob_chunk_tokens", 0): "all positions' logits at once (documented)",
    ("learner.export_interval", 0): "hub-format export only at the end (documented)",
    ("run.max_role_restarts", 0): "a role that dies ends the run",
    ("rm.rounds", 0): "the first reward model only, no iterated preferences (the default)",
    ("run.restart_delay_s", 0): "restart a dead role at once",
    ("reward.max_model_len", 0): "the reward model's positions (the default)",
    ("rm.margin", 0): "the Bradley-Terry loss without a margin (the default)",
    ("rm.margin", -1): "a negative margin loosens the pair-wise loss; valid",
    ("rm.weight_decay", 0): "no weight decay (the default)",
    ("rm.max_length", 0): "the base model's positions (the default)",
    ("rm.rater_temperature", 0): "simulated raters always pick the better (documented)",
}


def _numeric(tp) -> bool:
    """int or float, also inside a list, dict or Optional (bool is not numeric here)."""
    if tp in (int, float):
        return True
    return any(_numeric(a) for a in typing.get_args(tp))


def numeric_fields(cls=RunConfig, prefix=""):
    """(dotted path, type) of every numeric field, recursively from RunConfig."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from numeric_fields(tp, f"{prefix}{f.name}.")
        elif _numeric(tp):
            yield f"{prefix}{f.name}", tp


def _scalar_kind(tp):
    """int or float for a scalar (or Optional scalar) field, None for a container."""
    if tp in (int, float):
        return tp
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        kinds = [a for a in typing.get_args(tp) if a is not type(None)]
        return kinds[0] if len(kinds) == 1 and kinds[0] in (int, float) else None
    return None


SCALARS = [(p, _scalar_kind(t)) for p, t in numeric_fields() if _scalar_kind(t)]
CASES = [(p, v) for p, kind in SCALARS for v in (INT_VALUES if kind is int else FLOAT_VALUES)]


def test_every_numeric_field_has_exactly_one_bound():
    paths = {p for p, _ in numeric_fields()}
    assert paths - set(BOUNDS) == set(), "numeric fields without a bound in config.BOUNDS"
    assert set(BOUNDS) - paths == set(), "bounds for fields that no longer exist"
    for path, tp in numeric_fields():
        if _scalar_kind(tp):
            assert BOUNDS[path].kind is _scalar_kind(tp), path


def test_the_walk_reaches_every_section():
    sections = {p.split(".")[0] for p, _ in SCALARS}
    assert sections == {"seed", "task", "warm_start", "net", "generator", "buffer", "learner",
                        "env", "weight_sync", "run", "rm", "reward", "model"}


@pytest.mark.parametrize("path,value", CASES, ids=[f"{p}={v}" for p, v in CASES])
def test_extreme_value_is_refused_naming_the_field_or_known_to_run(path, value):
    if (path, value) in ACCEPTED:
        cfg = load_config(None, [f"{path}={value}"])
        got = cfg
        for name in path.split("."):
            got = getattr(got, name)
        assert got == value
        return
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{path}={value}"])
    msg = str(e.value)
    assert "\n" not in msg, msg  # one line: one bad field, one failure
    assert f"{path}=" in msg and "must be" in msg, msg


def test_accepted_list_has_no_stale_entries():
    walked = {(p, v) for p, v in CASES if not (isinstance(v, float) and math.isnan(v))}
    assert set(ACCEPTED) <= walked
    assert all(reason for reason in ACCEPTED.values())


@pytest.mark.parametrize("override,needle", [
    ("learner.eval_interval=0", "learner.eval_interval=0: must be an integer in [1, "),
    ("generator.max_tokens=0", "generator.max_tokens=0: must be an integer in [1, "),
    ("learner.nproc=0", "learner.nproc=0: must be an integer in [1, "),
    ("learner.lr=nan", "learner.lr=nan: must be a finite number in (0, 1]"),
    ("generator.prompts_per_call=6000", "generator.prompts_per_call=6000: must be <= task.train_size=5000"),
    ("generator.max_tokens=500", "generator.max_tokens=500: must be <= "),
    ("task.digits=1", "task.train_size + task.eval_size = 5512: exceeds the 100"),
    ("net.heartbeat_interval_s=9", "net.heartbeat_interval_s=9.0: must be < net.heartbeat_timeout_s"),
    ("generator.device_ids=[-1]", "generator.device_ids[0]=-1: must be an integer in [0, 1023]"),
    ("task.rewards.correctness=inf", "task.rewards.correctness=inf: must be a finite number"),
    ("learner.clip_c=1", "learner.clip_c=1.0 must be > 1 (or 0 for off)"),
])
def test_known_bad_values_are_named(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_fields_are_bounded_before_any_check_divides_or_combines_them():
    # nproc=0 once raised ZeroDivisionError in groups_per_rank; digits=10**12 would make
    # 100**digits never finish. Only the bounds are reported, one line each.
    with pytest.raises(ConfigError) as e:
        load_config(None, ["learner.nproc=0", "task.digits=1000000000000", "learner.lr=inf"])
    lines = str(e.value).splitlines()[1:]
    assert [ln.split("=")[0].strip() for ln in lines] == ["task.digits", "learner.nproc",
                                                          "learner.lr"]


def test_the_builtin_models_have_the_positions_config_assumes(tmp_path):
    from asyncrl.task.tiny_model import BUILTINS, build_model

    assert set(BUILTINS) == set(BUILTIN_MAX_POSITIONS)
    for name, spec in BUILTINS.items():
        model = build_model(16, 0, 1, 2, seed=0, positions=spec.positions)
        assert model.config.max_position_embeddings == BUILTIN_MAX_POSITIONS[name], name
    assert build_model(16, 0, 1, 2, seed=0).config.max_position_embeddings == 128


def test_the_positions_check_is_per_builtin():
    reasoning = ["task.name=reasoning", "model.path=builtin:tiny-reasoning"]
    load_config(None, [*reasoning, "generator.max_tokens=400"])  # 512 positions
    with pytest.raises(ConfigError, match="builtin:tiny-reasoning has 512 positions"):
        load_config(None, [*reasoning, "generator.max_tokens=500"])
    with pytest.raises(ConfigError, match="builtin:tiny-addition has 128 positions"):
        load_config(None, ["task.name=reasoning", "generator.max_tokens=100"])
    with pytest.raises(ConfigError, match="task.min_terms=9 > task.max_terms=4"):
        load_config(None, [*reasoning, "task.min_terms=9", "task.max_terms=4"])


def test_cli_names_a_bad_field_before_anything_starts(tmp_path):
    run_dir = tmp_path / "run"
    r = asyncrl("run", "configs/default.yaml", "learner.nproc=0", f"run_dir={run_dir}",
                timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "learner.nproc=0" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not run_dir.exists()  # failed at config load: no model built, no role started
