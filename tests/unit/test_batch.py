import pytest
import torch

from asyncrl.learner.batch import BatchRules, collate, refusal
from asyncrl.testing import make_groups


def test_collate_aligns_behaviour_logprobs_with_predicted_tokens():
    groups = make_groups(1, 2, prompts=[[1, 2]], tokens=[[[7, 8, 9], [5]]],
                         logprobs=[[[-1, -2, -3], [-0.5]]], rewards=[[1.0, 0.0]],
                         finish_reason=[["stop", "length"]], policy_version=4)
    b = collate(groups, pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 7, 8, 9], [1, 2, 5, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    # position t predicts token t+1: completions start being predicted at P-1 = 1
    assert b.completion_mask.tolist() == [[0, 1, 1, 1], [0, 1, 0, 0]]
    assert b.behav_logprobs.tolist() == [[0, -1, -2, -3], [0, -0.5, 0, 0]]
    assert b.rewards.tolist() == [[1.0, 0.0]]
    assert b.versions.tolist() == [[0, 4, 4, 4], [0, 4, 0, 0]]  # per completion token
    assert b.truncated.tolist() == [False, True]
    assert b.num_completion_tokens == 4
    # every predicted completion token is the token at the next position
    for i in range(2):
        pos = torch.nonzero(b.completion_mask[i]).flatten()
        toks = b.input_ids[i, pos + 1].tolist()
        assert toks == groups[0].completions[i].tokens.tolist()


def _groups(sizes, length=2, prompt=2):
    return make_groups(len(sizes), sizes, prompt_len=prompt, completion_len=length)


def test_a_batch_collate_or_the_model_cannot_take_is_refused_with_a_reason():
    rules = BatchRules(group_size=2, max_tokens=4, max_positions=8)
    assert refusal(_groups([2, 2]), 2, rules) is None
    assert refusal([], 2, rules) is None  # not_ready
    cases = {"too_many_groups": (_groups([2, 2, 2]), 2), "bad_group_size": (_groups([2, 3]), 2),
             "empty_prompt": (_groups([2], prompt=0), 1), "too_long": (_groups([2], length=5), 1)}
    for reason, (groups, asked) in cases.items():
        assert refusal(groups, asked, rules)[0] == reason
    assert refusal(_groups([2], length=4, prompt=5), 1, rules)[0] == "too_long"  # 9 > 8 positions
    # each refused case is one collate would crash on or train wrongly: ragged groups, P - 1 = -1
    with pytest.raises(ValueError):
        collate(_groups([2, 3]), pad_id=0)


def test_a_completion_across_a_weight_update_keeps_every_tokens_version():
    from asyncrl.learner.batch import token_staleness

    groups = make_groups(1, 2, prompts=[[1, 2]], tokens=[[[7, 8, 9], [5]]],
                         logprobs=[[[-1, -2, -3], [-0.5]]], versions=[[[4, 4, 6], None]],
                         policy_version=4)
    b = collate(groups, 0)
    assert b.versions.tolist() == [[0, 4, 4, 6], [0, 4, 0, 0]]
    # trained at version 6: two tokens and the other completion 2 behind, one token current
    assert token_staleness(b, 6) == {0: 1, 2: 3}
