"""metrics.jsonl's reward_<name> columns: each reward function's mean over the step's
completions, rescored from their decoded text."""

import numpy as np
import pytest

from asyncrl import wire
from asyncrl.learner.lead import reward_parts
from asyncrl.rewards import GRPO_DEMO_WEIGHTS, combine

GOOD = "<reasoning>\n3 + 4 = 7\n</reasoning>\n<answer>\n7\n</answer>"


class _Tok:  # token id i decodes to TEXTS[i]
    TEXTS = [GOOD, "The answer is 7.", "<answer>\n8\n</answer>"]

    def decode(self, ids, skip_special_tokens=True):
        assert skip_special_tokens  # as the generator decodes
        return "".join(self.TEXTS[i] for i in ids)


def _group(prompt_id, token_lists):
    comps = [wire.Completion(np.asarray(t, np.int32), np.zeros(len(t), np.float32), 0.0, "stop")
             for t in token_lists]
    return wire.TrajectoryGroup(prompt_id=prompt_id, prompt_tokens=np.asarray([0], np.int32),
                                policy_version=0, completions=comps, generator="gen0",
                                created_at=0.0)


def test_each_reward_is_averaged_over_the_completions():
    rules = combine(GRPO_DEMO_WEIGHTS)
    parts = reward_parts([_group(1, [[0], [1]]), _group(2, [[2]]), _group(99, [[0]])],
                         {1: "7", 2: "8"}, rules, _Tok())
    assert set(parts) == {f"reward_{k}" for k in GRPO_DEMO_WEIGHTS}
    assert parts["reward_strict_format"] == pytest.approx(1 / 3)  # prompt 99 is not counted
    assert parts["reward_correctness"] == pytest.approx(2 / 3)  # GOOD and "8"
    assert parts["reward_int"] == pytest.approx(2 / 3)
    assert parts["reward_xmlcount"] == pytest.approx((0.5 + 0 + 0.125) / 3)


def test_no_known_prompt_gives_no_columns():
    assert reward_parts([_group(5, [[0]])], {}, combine({"int": 1.0, "xmlcount": 1.0}),
                        _Tok()) == {}
