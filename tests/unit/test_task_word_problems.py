"""The word-problem task: every answer is what its numbers say, held-out problems never appear
in training, a seed reproduces its problems, and the prompt asks for the tagged layout."""

import re

import pytest

from asyncrl.config import ConfigError, load_config
from asyncrl.rewards import GRPO_DEMO_WEIGHTS, REWARD_FUNCTIONS
from asyncrl.task import chat_context, encode_prompt, load_task
from asyncrl.task.word_problems import TEMPLATES, make_problems
from tests.conftest import ROOT


def _question(p):
    return p.prompt


def _solve(q: str) -> int:
    """An independent solver written from the template texts."""
    n = [int(x) for x in re.findall(r"\d+", q)]
    if "bags with" in q:
        return n[0] * n[1]
    if "equally among" in q:
        return n[0] // n[1]
    if "buys" in q and "gives" in q:
        return n[0] + n[1] - n[2]
    if "gave" in q and "bought" in q:
        return n[0] - n[1] + n[2]
    if "buys" in q:
        return n[0] + n[1]
    return n[0] - n[1]


def test_answers_are_non_negative_integers_that_solve_the_question():
    train, held_out = make_problems(2, 2000, 200, seed=3)
    for p in train + held_out:
        assert int(p.answer) >= 0 and str(int(p.answer)) == p.answer
        assert _solve(_question(p)) == int(p.answer), p.prompt
        assert all(int(x) <= 99 for x in re.findall(r"\d+", _question(p)))


def test_held_out_split_is_disjoint_and_seeded():
    train, held_out = make_problems(2, 3000, 300, seed=5)
    assert len(train) == 3000 and len(held_out) == 300
    assert not {p.prompt for p in train} & {p.prompt for p in held_out}
    assert len({p.prompt for p in train}) == 3000
    again, _ = make_problems(2, 3000, 300, seed=5)
    assert [p.prompt for p in again] == [p.prompt for p in train]
    other, _ = make_problems(2, 3000, 300, seed=6)
    assert [p.prompt for p in other] != [p.prompt for p in train]


def test_every_template_is_used():
    train, _ = make_problems(2, 600, 10, seed=0)
    kinds = {"bags with": 0, "equally among": 0, "gives": 0, "bought": 0}
    for p in train:
        for k in kinds:
            kinds[k] += k in _question(p)
    assert all(kinds.values()) and len(TEMPLATES) == 6


def test_too_many_problems_for_the_digits_is_an_error_naming_the_fields():
    with pytest.raises(ValueError, match="task.digits=1"):
        make_problems(1, 100000, 10, seed=0)
    with pytest.raises(ValueError, match="task.digits=0"):
        make_problems(0, 10, 10, seed=0)


def test_the_configs_worked_examples_score_full_marks():
    cfg = load_config(ROOT / "configs" / "smollm2.yaml")
    turns = chat_context(cfg.task)
    assert turns[0]["role"] == "system" and "<reasoning>" in turns[0]["content"]
    assert [t["role"] for t in turns[1:]] == ["user", "assistant"] * 2
    for q, a in zip(turns[1::2], turns[2::2]):
        want = _solve(q["content"])
        for name in GRPO_DEMO_WEIGHTS:
            assert REWARD_FUNCTIONS[name](a["content"], str(want)) == (
                0.5 if name == "xmlcount" else 1.0), (name, a)


class _Tok:  # renders messages as role: content lines, encodes one id per character
    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "

    def encode(self, text, add_special_tokens):
        return [ord(c) for c in text]


def test_chat_turns_come_before_the_prompt_in_the_rendered_ids():
    cfg = load_config(None, ["task.chat_template=true", "task.system_prompt=S",
                             "task.chat_examples=[Q1,A1]"])
    ids = encode_prompt(_Tok(), "Q2", True, chat_context(cfg.task))
    assert "".join(map(chr, ids)) == "system: S\nuser: Q1\nassistant: A1\nuser: Q2\nassistant: "
    assert encode_prompt(_Tok(), "Q2", True) == [ord(c) for c in "user: Q2\nassistant: "]


def test_chat_turns_are_checked_when_the_config_loads():
    with pytest.raises(ConfigError, match="task.chat_examples has 1 turns"):
        load_config(None, ["task.chat_template=true", "task.chat_examples=[Q1]"])
    with pytest.raises(ConfigError, match="need task.chat_template=true"):
        load_config(None, ["task.system_prompt=S"])


def test_smollm2_config_loads_with_the_grpo_demo_recipe():
    cfg = load_config(ROOT / "configs" / "smollm2.yaml")
    assert cfg.model.path == "builtin:smollm2-135m-instruct"
    assert cfg.task.name == "word_problems" and cfg.task.chat_template
    assert cfg.task.rewards == GRPO_DEMO_WEIGHTS
    assert cfg.learner.advantage == "grpo" and cfg.learner.kl_coef > 0
    train, held_out = load_task(cfg.task)
    assert len(train) == cfg.task.train_size and len(held_out) == cfg.task.eval_size


class _ToolTok(_Tok):  # a template that renders tools itself, after the messages
    def apply_chat_template(self, messages, add_generation_prompt, tokenize, tools=None):
        text = super().apply_chat_template(messages, add_generation_prompt, tokenize)
        return text + (f"tools: {[t['function']['name'] for t in tools]}" if tools else "")


class _IgnoringTok(_Tok):  # a template that takes tools and ignores them (SmolLM2's)
    def apply_chat_template(self, messages, add_generation_prompt, tokenize, tools=None):
        return super().apply_chat_template(messages, add_generation_prompt, tokenize)

    def __len__(self):
        return 0x110000


def test_tools_are_rendered_by_the_template_or_written_into_the_system_turn():
    from asyncrl.env.calculator import Calculator
    from asyncrl.task import tools_system_text

    schemas = [t.schema() for t in Calculator().tools]
    text = "".join(map(chr, encode_prompt(_ToolTok(), "Q", True, None, schemas)))
    assert text.endswith("assistant: tools: ['add']")  # the template's own rendering wins
    plain = "".join(map(chr, encode_prompt(_IgnoringTok(), "Q", True, [
        {"role": "system", "content": "S"}], schemas)))
    assert plain == f"system: S\n\n{tools_system_text(schemas)}\nuser: Q\nassistant: "
    assert '"name": "add"' in plain and '"required": ["a", "b"]' in plain
    alone = "".join(map(chr, encode_prompt(_IgnoringTok(), "Q", True, None, schemas)))
    assert alone.startswith("system: You can call these tools")


def test_an_environments_tools_reach_the_episode_prompt_unless_turned_off():
    from asyncrl.generator.episode import episode_parts

    cfg = load_config(None, ["task.chat_template=true", "env.name=calculator"])
    spec, codec, _ = episode_parts(cfg, _IgnoringTok())
    assert [t.name for t in spec.tools] == ["add"]
    assert "<tools>" in "".join(map(chr, codec.prompt("Q")))
    cfg = load_config(None, ["task.chat_template=true", "env.name=calculator",
                             "env.tools_in_prompt=false"])
    assert "".join(map(chr, episode_parts(cfg, _IgnoringTok())[1].prompt("Q"))) == \
        "user: Q\nassistant: "
