import numpy as np
import torch

from asyncrl.learner.batch import collate
from asyncrl.wire import Completion, TrajectoryGroup


def test_collate_aligns_behaviour_logprobs_with_predicted_tokens():
    comps = [Completion(np.array([7, 8, 9], np.int32), np.array([-1, -2, -3], np.float32), 1.0, "stop"),
             Completion(np.array([5], np.int32), np.array([-0.5], np.float32), 0.0, "length")]
    g = TrajectoryGroup(0, np.array([1, 2], np.int32), 4, comps, "gen0", 0.0)
    b = collate([g], pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 7, 8, 9], [1, 2, 5, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    # position t predicts token t+1: completions start being predicted at P-1 = 1
    assert b.completion_mask.tolist() == [[0, 1, 1, 1], [0, 1, 0, 0]]
    assert b.behav_logprobs.tolist() == [[0, -1, -2, -3], [0, -0.5, 0, 0]]
    assert b.rewards.tolist() == [[1.0, 0.0]] and b.versions.tolist() == [4, 4]
    assert b.truncated.tolist() == [False, True]
    assert b.num_completion_tokens == 4
    # every predicted completion token is the token at the next position
    for i in range(2):
        pos = torch.nonzero(b.completion_mask[i]).flatten()
        toks = b.input_ids[i, pos + 1].tolist()
        assert toks == comps[i].tokens.tolist()
