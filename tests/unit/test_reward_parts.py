"""metrics.jsonl's reward_<name> columns: each part of the reward averaged over the step's
completions, as the generator's scorer computed it (the parts travel with each completion)."""

import numpy as np
import pytest

from asyncrl import wire
from asyncrl.generator.delivery import Scorer
from asyncrl.learner.lead import reward_parts
from asyncrl.rewards import GRPO_DEMO_WEIGHTS, combine

GOOD = "<reasoning>\n3 + 4 = 7\n</reasoning>\n<answer>\n7\n</answer>"


def _group(parts):
    comps = [wire.Completion(np.zeros(1, np.int32), np.zeros(1, np.float32), 0.0, "stop",
                             reward_parts=p) for p in parts]
    return wire.TrajectoryGroup(prompt_id=1, prompt_tokens=np.asarray([0], np.int32),
                                policy_version=0, completions=comps)


def test_each_part_is_averaged_over_the_completions_that_carry_it():
    parts = reward_parts([_group([{"a": 1.0, "b": 0.0}, {"a": 0.0, "b": 0.5}]),
                          _group([{"a": 1.0, "b": 1.0}]), _group([None])])
    assert parts == {"reward_a": pytest.approx(2 / 3), "reward_b": pytest.approx(0.5)}


def test_one_part_or_none_gives_no_columns():
    assert reward_parts([_group([{"correctness": 1.0}])]) == {}
    assert reward_parts([_group([None, None])]) == {}


class _Tok:  # token id i decodes to TEXTS[i]
    TEXTS = [GOOD, "The answer is 7.", "<answer>\n8\n</answer>"]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.TEXTS[i] for i in ids)


class _Problem:
    id, prompt, answer = 1, "3+4?", "7"


def test_the_scorer_sends_the_parts_its_reward_is_made_of():
    from types import SimpleNamespace

    from asyncrl.generator.engine import Sample

    cfg = SimpleNamespace(task=SimpleNamespace(rewards=dict(GRPO_DEMO_WEIGHTS), reward_model="",
                                               reward_model_weight=1.0),
                          reward=SimpleNamespace(service=False, normalize="none"))
    scorer = Scorer(cfg, _Tok())
    g = scorer.group(_Problem(), [0], [Sample([0], [-0.1], "stop"), Sample([2], [-0.1], "stop")],
                     0, "gen0")
    rules = combine(GRPO_DEMO_WEIGHTS)
    for c, text in zip(g.completions, [GOOD, "<answer>\n8\n</answer>"]):
        assert c.reward_parts == rules.components(text, "7")
        assert c.reward == pytest.approx(rules(text, "7"))
    assert reward_parts([g])["reward_correctness"] == pytest.approx(0.5)


def test_episode_figures_are_logged_under_their_own_names():
    parts = reward_parts([_group([
        {"env": 1.0, "episode_turns": 3.0, "episode_tool_calls": 2.0, "episode_tool_errors": 0.0},
        {"env": 0.0, "episode_turns": 1.0, "episode_tool_calls": 2.0, "episode_tool_errors": 1.0},
    ])])
    assert parts == {"episode_turns": 2.0, "episode_tool_calls": 2.0,
                     "episode_tool_errors": 0.5, "tool_success": 0.75}
