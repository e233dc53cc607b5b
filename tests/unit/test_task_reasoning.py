"""The reasoning task: right problems, disjoint splits, a long tail of lengths in the tokens of
the builtin:tiny-reasoning tokenizer, and reference completions every reward scores at its
maximum."""

import re

import numpy as np
import pytest

from asyncrl.config import load_config
from asyncrl.rewards import REWARD_FUNCTIONS
from asyncrl.task import load_task
from asyncrl.task.reasoning import TAGS, make_problems, prompt_terms, solution, term_weights
from tests.conftest import ROOT

CONFIG = ROOT / "configs" / "reasoning.yaml"
# Each reward's maximum (rewards.py: 1.0, except xmlcount's four 0.125s).
MAX_REWARD = {"correctness": 1.0, "int": 1.0, "strict_format": 1.0, "soft_format": 1.0,
              "xmlcount": 0.5}


@pytest.fixture(scope="module")
def task():
    return load_config(CONFIG).task


@pytest.fixture(scope="module")
def problems(task):
    return load_task(task)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    from asyncrl.task.tiny_model import BUILTINS, build_tokenizer

    d = tmp_path_factory.mktemp("tok")
    build_tokenizer(d, BUILTINS["builtin:tiny-reasoning"].added_tokens)
    return AutoTokenizer.from_pretrained(d)


@pytest.fixture(scope="module")
def exact(task):
    """The problems with an exact teacher (task.carry_slip=0)."""
    return make_problems(task.digits, task.min_terms, task.max_terms, task.terms_tail,
                         task.train_size, task.eval_size, task.seed, carry_slip=0.0)


def _lines(reference: str) -> tuple[list[tuple[int, int, int]], int]:
    body = re.fullmatch(r"<reasoning>\n(.*)\n</reasoning>\n<answer>\n(\d+)\n</answer>",
                        reference, re.DOTALL)
    assert body, reference
    lines = [tuple(map(int, re.fullmatch(r"(\d+)\+(\d+)=(\d+)", line).groups()))
             for line in body.group(1).split("\n")]
    return lines, int(body.group(2))


def test_the_scratchpad_adds_up_and_the_answer_is_the_sum(exact, problems):
    train, held_out = exact
    assert problems[1] == held_out  # the config's held-out references are the exact ones
    for p in train[:2000] + held_out:
        terms = prompt_terms(p.prompt)
        assert p.answer == str(sum(terms))
        body = re.fullmatch(r"<reasoning>\n(.*)\n</reasoning>\n<answer>\n(\d+)\n</answer>",
                            p.reference, re.DOTALL)
        assert body and body.group(2) == p.answer, p.reference
        total = terms[0]
        lines = body.group(1).split("\n")
        assert len(lines) == len(terms) - 1
        for line, term in zip(lines, terms[1:]):
            a, b, c = map(int, re.fullmatch(r"(\d+)\+(\d+)=(\d+)", line).groups())
            assert (a, b) == (total, term) and c == a + b
            total = c


def test_the_imperfect_teacher_forgets_carries_at_its_rate_and_only_in_training(task, exact,
                                                                              problems):
    # configs/reasoning.yaml distils a teacher that slips (task.carry_slip, reasoning.py)
    assert 0.5 < task.carry_slip < 1
    train, held_out = problems
    # the same problems and exact answers; only the training references differ
    assert [(p.prompt, p.answer) for p in train] == [(p.prompt, p.answer) for p in exact[0]]
    assert held_out == exact[1]
    carries = slips = 0
    for p in train[:3000]:
        terms = prompt_terms(p.prompt)
        lines, answer = _lines(p.reference)
        total = terms[0]
        for (a, b, c), term in zip(lines, terms[1:], strict=True):
            assert (a, b) == (total, term)  # each line goes on from the last line's result
            carry = a % 10 + b % 10 >= 10
            assert c == a + b or (carry and c == a + b - 10), (a, b, c)
            carries += carry
            slips += c != a + b
            total = c
        assert answer == total  # the teacher's own (possibly wrong) total
    assert slips / carries == pytest.approx(task.carry_slip, abs=0.02)
    wrong = sum(_lines(p.reference)[1] != int(p.answer) for p in train[:3000])
    assert 0.4 < wrong / 3000 < 0.95  # most multi-step traces end wrong
    # at 0 nothing slips, and the problems are those of any slip rate
    assert make_problems(2, 2, 4, 1.0, 50, 10, 3, carry_slip=1.0)[1] == make_problems(
        2, 2, 4, 1.0, 50, 10, 3)[1]
    with pytest.raises(ValueError, match="task.carry_slip"):
        load_config(CONFIG, ["task.carry_slip=1.5"])
    with pytest.raises(ValueError, match="task.carry_slip=0.5 shapes .* not 'dataset'"):
        load_config(ROOT / "configs" / "default.yaml",
                    ["task.carry_slip=0.5", "task.name=dataset", f"task.path={CONFIG}"])


def test_train_and_held_out_are_disjoint_distinct_and_seeded(task, problems):
    train, held_out = problems
    assert len(train) == task.train_size and len(held_out) == task.eval_size
    prompts = [p.prompt for p in train + held_out]
    assert len(set(prompts)) == len(prompts)
    assert not {p.prompt for p in train} & {p.prompt for p in held_out}
    again = make_problems(task.digits, task.min_terms, task.max_terms, task.terms_tail,
                          task.train_size, task.eval_size, task.seed, task.carry_slip)
    assert again == problems
    other = make_problems(task.digits, task.min_terms, task.max_terms, task.terms_tail,
                          100, 10, task.seed + 1)
    assert [p.prompt for p in other[1]] != [p.prompt for p in held_out[:10]]


def test_number_of_terms_follows_the_power_law(task, problems):
    train, _ = problems
    ks = np.array([len(prompt_terms(p.prompt)) for p in train])
    assert ks.min() == task.min_terms and ks.max() == task.max_terms
    weights = term_weights(task.min_terms, task.max_terms, task.terms_tail)
    assert sum(weights) == pytest.approx(1.0) and weights == sorted(weights, reverse=True)
    # the shortest problems are the most common, as drawn (the short ones are not exhausted)
    share = np.mean(ks == task.min_terms)
    assert share == pytest.approx(weights[0], abs=0.02)


def test_reference_lengths_in_tokens_have_a_long_tail(problems, tok):
    train, _ = problems
    # what the generator samples: the completion and its EOS
    lengths = [len(tok.encode(p.reference, add_special_tokens=False)) + 1 for p in train[:5000]]
    p10, p50, p90 = np.percentile(lengths, [10, 50, 90])
    assert p50 >= 30, (p10, p50, p90)
    assert p90 >= 4 * p10, (p10, p50, p90)


def test_the_longest_reference_fits_in_max_tokens_and_the_model(problems, tok):
    from asyncrl.config import BUILTIN_MAX_POSITIONS
    from asyncrl.task import encode_prompt

    cfg = load_config(CONFIG)
    train, held_out = problems
    longest = max(len(tok.encode(p.reference, add_special_tokens=False)) + 1
                  for p in train + held_out)
    assert longest <= cfg.generator.max_tokens
    prompt = max(len(encode_prompt(tok, p.prompt)) for p in train + held_out)
    assert prompt + cfg.generator.max_tokens + 8 <= BUILTIN_MAX_POSITIONS[cfg.model.path]


def test_the_reference_scores_the_maximum_of_every_reward(exact, problems):
    train, held_out = exact
    cfg = load_config(CONFIG)
    assert set(cfg.task.rewards) <= set(MAX_REWARD)
    for p in train[:300] + held_out[:300]:
        for name, best in MAX_REWARD.items():
            assert REWARD_FUNCTIONS[name](p.reference, p.answer) == best, (name, p.reference)
    wrong = solution([17, 5]).replace("22\n</answer>", "23\n</answer>")
    assert REWARD_FUNCTIONS["correctness"](wrong, "22") == 0.0
    # the imperfect teacher's traces keep the layout: every format reward at its maximum
    for p in problems[0][:300]:
        for name in ("int", "strict_format", "soft_format", "xmlcount"):
            assert REWARD_FUNCTIONS[name](p.reference, p.answer) == MAX_REWARD[name]


def test_the_tags_are_single_tokens_that_decode_back(tok):
    for tag in TAGS:
        ids = tok.encode(tag, add_special_tokens=False)
        assert len(ids) == 1, tag
        assert ids[0] not in tok.all_special_ids  # skip_special_tokens must keep it
    text = solution([17, 5, 33, 8])
    ids = tok.encode(text, add_special_tokens=False)
    assert sum(i in {tok.convert_tokens_to_ids(t) for t in TAGS} for i in ids) == 4
    # the generator decodes sampled tokens (ending in EOS) like this
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text
    assert len(ids) == len(text) - sum(len(t) - 1 for t in TAGS)  # one token per other char


def test_cache_keys_separate_the_builtins_and_keep_the_default(task):
    from asyncrl.task.tiny_model import cache_key

    default = load_config(ROOT / "configs" / "default.yaml")
    # the embedded default's cached model (~/.cache/asyncrl/tiny-addition-1641c5b256bc); the
    # one built before the two-phase warm start keeps its key under the old settings
    assert cache_key(default) == "1641c5b256bc"
    old = ["task.carry_slip=0", "warm_start.steps=800", "warm_start.until_loss=0",
           "warm_start.slip_steps=0"]
    assert cache_key(load_config(ROOT / "configs" / "default.yaml", old)) == "e784bf8d0444"
    reasoning = load_config(CONFIG)
    other = load_config(CONFIG, [f"task.max_terms={task.max_terms - 1}"])
    assert len({cache_key(default), cache_key(reasoning), cache_key(other)}) == 3


def test_the_sft_schedule_warms_up_then_stays_or_decays_and_only_cosine_changes_the_key():
    from asyncrl.task.tiny_model import cache_key, sft_lr_factor

    assert [sft_lr_factor(s, 100, "constant") for s in (0, 9, 19, 20, 99)] == [
        0.05, 0.5, 1.0, 1.0, 1.0]  # what every model built before the option had
    cos = [sft_lr_factor(s, 100, "cosine") for s in range(100)]
    assert cos[:20] == [(s + 1) / 20 for s in range(20)] and cos[20] == 1.0
    assert all(a >= b for a, b in zip(cos[20:], cos[21:])) and cos[-1] < 0.001
    assert abs(sft_lr_factor(60, 100, "cosine") - 0.5) < 1e-9  # halfway down at mid-decay
    # the model built with 1500 constant-rate steps before the option existed keeps its key
    exact = ["task.carry_slip=0"]  # the config's before the imperfect teacher, built before
    plain = load_config(CONFIG, [*exact, "warm_start.steps=1500",
                                 "warm_start.lr_schedule=constant"])
    assert cache_key(plain) == "934a6543afd3"
    assert cache_key(load_config(CONFIG, [*exact, "warm_start.steps=1500",
                                          "warm_start.lr_schedule=cosine"])) != "934a6543afd3"
    with pytest.raises(ValueError, match="warm_start.lr_schedule"):
        load_config(CONFIG, ["warm_start.lr_schedule=linear"])
    # warm_start.min_lr_ratio: the cosine ends there instead of at 0; at 0 the keys stay
    floored = [sft_lr_factor(s, 100, "cosine", floor=0.1) for s in range(100)]
    assert floored[:21] == cos[:21] and abs(floored[-1] - 0.1) < 0.001
    assert abs(sft_lr_factor(60, 100, "cosine", floor=0.1) - 0.55) < 1e-9
    assert sft_lr_factor(50, 100, "constant", floor=0.1) == 1.0
    assert cache_key(load_config(CONFIG, exact)) == "2afba32a24bf"
    assert cache_key(load_config(CONFIG, [*exact, "warm_start.min_lr_ratio=0.1"])) != (
        "2afba32a24bf")
    assert cache_key(load_config(CONFIG, [])) != "2afba32a24bf"  # task.carry_slip keys it
    with pytest.raises(ValueError, match="warm_start.min_lr_ratio"):
        load_config(CONFIG, ["warm_start.min_lr_ratio=1.5"])
    with pytest.raises(ValueError, match="min_lr_ratio=0.1 is where a cosine .* not 'constant'"):
        load_config(CONFIG, ["warm_start.min_lr_ratio=0.1", "warm_start.lr_schedule=constant"])


def test_too_many_problems_for_the_space_fail_naming_the_fields():
    with pytest.raises(ValueError, match="task.train_size"):
        make_problems(1, 2, 2, 1.0, 100, 10, 0)  # only 81 two-term sums of one digit
