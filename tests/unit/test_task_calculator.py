"""The agentic calculator task: the teacher's transcripts (tool calls, results, the answer),
its imperfection (tool_skip, carry_slip), and the warm start's batches, which train on the
model's turns, each ended by EOS, and never on the tool's results."""

import random

from asyncrl.task.calculator import SEP, make_problems, segments, transcript
from asyncrl.task.reasoning import prompt_terms


def test_an_exact_teacher_calls_the_tool_for_every_term_and_answers_right():
    segs = transcript([17, 5, 33], 0.0, 0.0, random.Random(0))
    assert segs == [("<calc>+17</calc>", True), ("<result>17</result>\n", False),
                    ("<calc>+5</calc>", True), ("<result>22</result>\n", False),
                    ("<calc>+33</calc>", True), ("<result>55</result>\n", False),
                    ("<answer>55</answer>", True)]
    from asyncrl.env.calculator import Calculator
    from asyncrl.task.addition import Problem

    env = Calculator()  # the environment answers the teacher's calls with its results
    env.reset(Problem(0, "17+5+33=", "55"))
    for text, by_model in segs[:-1]:
        if by_model:
            obs = env.step(text).observation
        else:
            assert obs == text
    assert env.step(segs[-1][0]).done and env.score() == 1.0


def test_a_teacher_that_skips_the_tool_adds_the_rest_in_its_head():
    skipped = transcript([17, 5, 33], 1.0, 0.0, random.Random(0))
    assert skipped == [("<calc>+17</calc>", True), ("<result>17</result>\n", False),
                       ("<answer>55</answer>", True)]  # one call, the rest added right
    slipping = transcript([18, 5, 37], 1.0, 1.0, random.Random(0))
    assert slipping[-1] == ("<answer>40</answer>", True)  # forgot both carries: 13, then 40


def test_the_problems_carry_their_transcripts_and_exact_answers():
    train, _ = make_problems(2, 3, 4, 1.0, 300, 50, 7, tool_skip=0.4, carry_slip=0.6)
    right = 0
    for p in train:
        segs = segments(p.reference)
        assert SEP in p.reference or len(segs) == 1
        assert [by for _, by in segs] == [i % 2 == 0 for i in range(len(segs))]
        assert str(sum(prompt_terms(p.prompt))) == p.answer
        right += segs[-1][0] == f"<answer>{p.answer}</answer>"
    assert 0.3 < right / len(train) < 0.95  # an imperfect teacher, not a useless one


def test_the_warm_start_trains_on_the_model_turns_only(tmp_path):
    from transformers import AutoTokenizer

    from asyncrl.task import calculator
    from asyncrl.task.tiny_model import _sft_batch, build_tokenizer

    build_tokenizer(tmp_path, calculator.TAGS)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    train, _ = make_problems(2, 3, 3, 1.0, 20, 5, 1, tool_skip=0.0)
    ids, labels = _sft_batch(tok, train[:2])
    p = train[0]
    row, lab = ids[0].tolist(), labels[0].tolist()
    trained = tok.decode([t for t, label in zip(row, lab) if label != -100])
    terms = prompt_terms(p.prompt)
    assert trained.count("</s>") == 4  # each model turn ends with EOS
    assert "<result>" not in trained and f"<calc>+{terms[1]}</calc>" in trained
    assert f"<answer>{p.answer}</answer>" in trained
    assert tok.convert_tokens_to_ids("<calc>") in row  # the tags are single tokens


def test_the_calculator_takes_the_chat_templates_tool_calls_checked_against_its_schema():
    from asyncrl.env.calculator import Calculator

    env = Calculator(max_digits=3)
    env.reset(type("P", (), {"prompt": "17+5=", "answer": 22})())
    call = '<tool_call>{{"name": "{}", "arguments": {}}}</tool_call>'.format
    assert env.step(call("add", '{"a": 17, "b": 5}')).observation == "<result>22</result>\n"
    assert env.memory == 22
    for name, args, says in [("add", '{"a": 1}', "missing ['b']"),
                             ("add", '{"a": 1, "b": 2, "c": 3}', "unknown ['c']"),
                             ("add", '{"a": "__import__(\'os\')", "b": 2}', "integers"),
                             ("add", '{"a": 1000, "b": 2}', "at most 3 digits"),
                             ("add", '{"a": -1, "b": 2}', "not negative"),
                             ("mul", '{"a": 1, "b": 2}', "no tool named 'mul'"),
                             ("add", '[1, 2]', "arguments are an object")]:
        assert says in env.step(call(name, args)).observation
    assert env.memory == 22 and env.tool_errors == 7 and env.tool_calls == 8
    assert env.step("<answer>22</answer>").done and env.score() == 1.0
