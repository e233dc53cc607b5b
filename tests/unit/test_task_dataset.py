import json

import pytest

from asyncrl.config import ConfigError, load_config
from asyncrl.task import encode_prompt, load_task


def _write(path, n=20):
    path.write_text("\n".join(json.dumps({"question": f"What is {i}+{i}?", "solution": str(2 * i)})
                              for i in range(n)) + "\n")
    return path


def test_jsonl_records_split_into_disjoint_train_and_eval(tmp_path):
    p = _write(tmp_path / "math.jsonl")
    cfg = load_config(None, ["task.name=dataset", f"task.path={p}", "task.prompt_field=question",
                             "task.answer_field=solution", "task.eval_size=5"])
    train, held_out = load_task(cfg.task)
    assert len(train) == 15 and len(held_out) == 5
    assert not {x.id for x in train} & {x.id for x in held_out}
    assert all(x.answer == str(2 * x.id) for x in train + held_out)


def test_missing_field_and_missing_file_are_named(tmp_path):
    p = _write(tmp_path / "math.jsonl")
    cfg = load_config(None, ["task.name=dataset", f"task.path={p}", "task.eval_size=5"])
    with pytest.raises(ValueError, match="'prompt'"):
        load_task(cfg.task)
    with pytest.raises(ConfigError, match="task.path"):
        load_config(None, ["task.name=dataset", f"task.path={tmp_path / 'nope.jsonl'}"])


def test_parquet_records(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "m.parquet"
    pq.write_table(pa.table({"prompt": [f"q{i}" for i in range(10)],
                             "answer": [str(i) for i in range(10)]}), p)
    cfg = load_config(None, ["task.name=dataset", f"task.path={p}", "task.eval_size=2"])
    train, held_out = load_task(cfg.task)
    assert len(train) == 8 and {x.prompt for x in train + held_out} == {f"q{i}" for i in range(10)}


def test_chat_template_prompt_encoding(tmp_path):
    from transformers import AutoTokenizer

    from asyncrl.task.tiny_model import build_tokenizer

    build_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    ids = encode_prompt(tok, "1+1=", chat_template=True)
    assert tok.decode(ids) == "<user>1+1=<assistant>"
    assert encode_prompt(tok, "1+1=")[0] == tok.bos_token_id
