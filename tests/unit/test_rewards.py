import math

import pytest

from asyncrl.rewards import (
    GRPO_DEMO_WEIGHTS,
    REWARD_FUNCTIONS,
    CompositeReward,
    RewardModelScorer,
    combine,
    correctness_reward,
    extract_answer,
    int_reward,
    math_verify_reward,
    scratchpad_reward,
    soft_format_reward,
    strict_format_reward,
    xmlcount_reward,
)

GOOD = "<reasoning>\n7+5 is 12\n</reasoning>\n<answer>\n12\n</answer>\n"
MULTILINE = "<reasoning>\nfirst 7\nthen 5\n</reasoning>\n<answer>\n12\n</answer>"
SOFT_ONLY = "  <reasoning>7+5</reasoning> <answer> 12 </answer>\n"
TRAILING = GOOD.rstrip("\n") + "\nand more"


def test_extract_answer():
    assert extract_answer(GOOD) == "12"
    assert extract_answer(" 352\n") == "352"  # tag-free completions, like the addition task
    assert extract_answer("<answer>1</answer> <answer> 2 </answer>") == "2"
    assert extract_answer("<answer> 7 and then") == "7 and then"


def test_correctness_and_int_rewards():
    assert correctness_reward(GOOD, "12") == 1.0
    assert correctness_reward("352", "352") == 1.0
    assert correctness_reward(GOOD, "13") == 0.0
    assert correctness_reward("<answer>12.0</answer>", "12") == 0.0
    assert int_reward(GOOD) == 1.0
    assert int_reward("<answer>-3</answer>") == 1.0
    assert int_reward("<answer>3.5</answer>") == 0.0
    assert int_reward("<answer>twelve</answer>") == 0.0


def test_strict_format_requires_the_exact_layout():
    assert strict_format_reward(GOOD) == 1.0
    assert strict_format_reward(MULTILINE) == 1.0
    assert strict_format_reward(SOFT_ONLY) == 0.0
    assert strict_format_reward(TRAILING) == 0.0
    assert strict_format_reward(" " + GOOD) == 0.0
    assert strict_format_reward("<answer>\n12\n</answer>") == 0.0


def test_soft_format_allows_whitespace_only():
    assert soft_format_reward(GOOD) == 1.0
    assert soft_format_reward(MULTILINE) == 1.0
    assert soft_format_reward(SOFT_ONLY) == 1.0
    assert soft_format_reward(TRAILING) == 0.0
    assert soft_format_reward("<answer>12</answer><reasoning>x</reasoning>") == 0.0


def test_scratchpad_scores_each_step_of_the_worked_sum():
    from asyncrl.task.reasoning import solution

    right = solution([17, 5, 33, 8])
    assert scratchpad_reward(right) == 1.0
    # A wrong sum in the second step fails it, and the next step too, whose a (55) does not
    # continue from the c written (54); carrying the wrong c on keeps the later steps right.
    slip = right.replace("22+33=55", "22+33=54")
    assert scratchpad_reward(slip) == pytest.approx(1 / 3)  # 55+8 does not follow 54
    carried = slip.replace("55+8=63", "54+8=62")
    assert scratchpad_reward(carried) == pytest.approx(2 / 3)
    # A line that is not a step counts against it, and the step after it starts afresh; no
    # reasoning block, or an empty one, is 0.
    assert scratchpad_reward(right.replace("22+33=55", "I add 33")) == pytest.approx(2 / 3)
    assert scratchpad_reward("<answer>\n63\n</answer>") == 0.0
    assert scratchpad_reward("<reasoning>\n\n</reasoning>") == 0.0
    # Unclosed block: the rest is the reasoning. Huge numbers are not steps (and not parsed).
    assert scratchpad_reward("<reasoning>\n1+2=3\n3+4=7") == 1.0
    assert scratchpad_reward("<reasoning>\n" + "9" * 5000 + "+1=1\n") == 0.0
    assert "scratchpad" in REWARD_FUNCTIONS


def test_xmlcount_counts_tags_and_penalises_trailing_text():
    assert xmlcount_reward(GOOD) == pytest.approx(0.5)
    assert xmlcount_reward(GOOD.rstrip("\n")) == pytest.approx(0.5)
    assert xmlcount_reward(TRAILING) == pytest.approx(0.5 - 0.001 * (len("\nand more") - 1))
    assert xmlcount_reward("<answer>\n12\n</answer>") == pytest.approx(0.125)
    assert xmlcount_reward(SOFT_ONLY) == 0.0
    assert xmlcount_reward(GOOD + GOOD) == 0.0  # every tag twice


def test_composite_reward_is_the_weighted_sum():
    reward = combine({"correctness": 2.0, "xmlcount": 1.0, "soft_format": 0.5})
    assert reward(GOOD, "12") == pytest.approx(2.0 + 0.5 + 0.5)
    assert reward(SOFT_ONLY, "12") == pytest.approx(2.0 + 0.0 + 0.5)
    assert reward(GOOD, "13") == pytest.approx(0.5 + 0.5)
    assert reward.components(GOOD, "13") == {"correctness": 0.0, "xmlcount": 0.5,
                                            "soft_format": 1.0}
    assert combine(GRPO_DEMO_WEIGHTS)(GOOD, "12") == pytest.approx(2.0 + 0.5 * 3 + 0.5)


def test_unknown_reward_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="correctness") as e:
        combine({"corectness": 1.0})
    assert "corectness" in str(e.value)
    with pytest.raises(ValueError):
        CompositeReward({"nope": 1.0})
    assert set(REWARD_FUNCTIONS) >= {"correctness", "int", "strict_format", "soft_format",
                                     "xmlcount", "math_verify"}


def test_math_verify_reward():
    pytest.importorskip("math_verify")
    assert math_verify_reward("<answer>\n0.5\n</answer>", "\\frac{1}{2}") == 1.0
    assert math_verify_reward("so the answer is $\\frac{1}{2}$", "0.5") == 1.0
    assert math_verify_reward("352", "352") == 1.0
    assert math_verify_reward("<answer>0.6</answer>", "0.5") == 0.0
    assert math_verify_reward("no idea", "0.5") == 0.0


def test_reward_model_scorer_returns_one_finite_float_per_pair(tmp_path):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from asyncrl.task.tiny_model import build_tokenizer

    build_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=64, num_labels=1,
                         pad_token_id=tok.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)

    scorer = RewardModelScorer(tmp_path, batch_size=2)
    prompts = ["12+34=", "1+1=", "99+1="]
    completions = ["46", "a much longer wrong answer", "100"]
    scores = scorer.score(prompts, completions)
    assert len(scores) == 3
    assert all(isinstance(s, float) and math.isfinite(s) for s in scores)
    # padding must not change a pair's score: score each alone and compare
    alone = [scorer.score([p], [c])[0] for p, c in zip(prompts, completions, strict=True)]
    assert scores == pytest.approx(alone, abs=1e-5)
    with pytest.raises(ValueError, match="completions"):
        scorer.score(prompts, completions[:2])


def test_reward_model_scorer_unknown_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        RewardModelScorer(tmp_path / "missing")
