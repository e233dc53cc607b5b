"""The addition task's imperfect teacher (task.carry_slip) and the warm start's own seed."""

from pathlib import Path

import pytest

from asyncrl.config import load_config
from asyncrl.task import load_task
from asyncrl.task.addition import make_problems
from asyncrl.task.tiny_model import cache_key

DEFAULT = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"


def _carries(p) -> bool:
    a, b = map(int, p.prompt.rstrip("=").split("+"))
    return a % 10 + b % 10 >= 10


def test_the_slipping_teacher_forgets_the_units_carry_at_its_rate_in_training_only():
    train, held_out = make_problems(2, 5000, 512, 7, carry_slip=0.6)
    exact_train, exact_held = make_problems(2, 5000, 512, 7)
    # the same problems and answers whatever the slip; only the references differ
    assert [(p.prompt, p.answer) for p in train] == [(p.prompt, p.answer) for p in exact_train]
    assert held_out == exact_held and all(not p.reference for p in held_out)
    assert all(not p.reference for p in exact_train)
    carries = [p for p in train if _carries(p)]
    slipped = [p for p in carries if p.reference != p.answer]
    assert all(int(p.reference) == int(p.answer) - 10 for p in slipped)
    assert all(p.reference == p.answer for p in train if not _carries(p))
    assert len(slipped) / len(carries) == pytest.approx(0.6, abs=0.03)


def test_load_task_passes_carry_slip_and_the_key_follows_it():
    cfg = load_config(DEFAULT, ["task.carry_slip=0.5"])
    train, _ = load_task(cfg.task)
    assert any(p.reference != p.answer for p in train)
    assert cache_key(cfg) != cache_key(load_config(DEFAULT, ["task.carry_slip=0",
                                                             "warm_start.slip_steps=0"]))


def test_warm_start_seed_keys_the_build_and_minus_one_is_the_runs_seed():
    keys = {cache_key(load_config(DEFAULT, [f"warm_start.seed={s}"])) for s in range(5)}
    assert len(keys) == 5
    base = load_config(DEFAULT, [])
    assert base.warm_start.seed == -1
    assert cache_key(load_config(DEFAULT, ["warm_start.seed=-1"])) == cache_key(base)
    with pytest.raises(ValueError, match="warm_start.seed"):
        load_config(DEFAULT, ["warm_start.seed=-2"])


def test_the_warm_start_stops_once_its_loss_averages_below_until_loss(tmp_path):
    import json

    from asyncrl.task.tiny_model import _MovingAverage, prepare_builtin

    avg = _MovingAverage(3)
    assert [avg.add(v) for v in (3.0, 3.0, 3.0, 0.0)] == [float("inf")] * 2 + [3.0, 2.0]
    lines = []
    cfg = load_config(DEFAULT, [f"warm_start.cache_dir={tmp_path}", "warm_start.steps=400",
                                "warm_start.until_loss=50",  # below 50 from the start
                                "warm_start.slip_steps=0"])
    out = prepare_builtin(cfg, lines.append)
    built = json.loads((out / "asyncrl_build.json").read_text())
    assert built["sft_steps"] == 50, lines  # the first full average of 50 steps
    assert any("warm_start.until_loss=50 at step 50" in x for x in lines), lines
    assert cache_key(cfg) != cache_key(load_config(DEFAULT, ["warm_start.steps=400",
                                                             "warm_start.slip_steps=0"]))


def test_slip_steps_trains_exact_answers_first_then_the_slipping_teacher(tmp_path):
    import json

    from asyncrl.task.tiny_model import _sft_batch, prepare_builtin

    cfg = load_config(DEFAULT, ["task.carry_slip=1.0"])
    train, _ = load_task(cfg.task)
    carry = [p for p in train if _carries(p)][:4]

    class Tok:  # one id per character, as the builtin tokenizer has
        pad_token_id, eos_token_id, bos_token_id = 0, 2, 1

        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

    def targets(exact):
        _, labels = _sft_batch(Tok(), carry, exact)
        return ["".join(chr(i) for i in row.tolist() if i not in (-100, 2)) for row in labels]

    assert targets(True) == [p.answer for p in carry]
    assert targets(False) == [str(int(p.answer) - 10) for p in carry]
    with pytest.raises(ValueError, match="warm_start.slip_steps=5 .* needs task.carry_slip"):
        load_config(DEFAULT, ["warm_start.slip_steps=5", "task.carry_slip=0"])
    lines = []
    cfg = load_config(DEFAULT, [f"warm_start.cache_dir={tmp_path}", "warm_start.steps=3",
                                "task.carry_slip=0.5", "warm_start.slip_steps=2"])
    out = prepare_builtin(cfg, lines.append)
    assert json.loads((out / "asyncrl_build.json").read_text())["sft_steps"] == 5
    assert any("2 more steps on the teacher that forgets the carry" in x for x in lines), lines
