"""asyncrl train-rm: bad rows counted and skipped, an unusable file refused naming it, the
pair-wise and point-wise losses learn a preference a small model can see, and what it writes
is a one-label sequence classifier the run's scorer loads."""

import json
import math

import pytest

from asyncrl.cli import main
from asyncrl.config import load_config
from asyncrl.rewards import RewardModelScorer, gold_reward
from asyncrl.rm.data import RmDataError, read_rm_data
from asyncrl.rm.gold import label_pairs
from asyncrl.testing import build_tiny_model


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _pairs(n):  # the preferred answer ends in 7, the other in 3: visible on the last token
    return [{"prompt": f"{i:02d}+{i:02d}=", "chosen": f"{i}7", "rejected": f"{i}3"}
            for i in range(n)]


def test_bad_rows_are_counted_by_reason_and_a_file_without_a_usable_row_is_refused(tmp_path):
    rows = _pairs(2) + ["{not json", {"prompt": "p", "chosen": "a"},
                        {"prompt": "p", "chosen": " ", "rejected": "b"},
                        {"prompt": "p", "chosen": "a", "rejected": "a"},
                        {"prompt": 3, "chosen": "a", "rejected": "b"},
                        {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}]
    data = read_rm_data(_write(tmp_path / "p.jsonl", rows))
    assert data.kind == "pairwise" and len(data.rows) == 2
    assert data.bad == {"not JSON": 1, "missing rejected": 1, "empty response": 1,
                        "chosen equals rejected": 1, "prompt not text": 1,
                        "margin not a finite number": 1}
    scored = read_rm_data(_write(tmp_path / "s.jsonl", [
        {"prompt": "p", "response": "r", "score": 1.5}, {"prompt": "p", "response": "r"},
        {"prompt": "p", "response": "r", "score": float("nan")}]))
    assert scored.kind == "pointwise" and scored.bad == {"score missing or not a finite number": 2}
    with pytest.raises(RmDataError, match=r"bad\.jsonl.*no usable row.*2 not JSON"):
        read_rm_data(_write(tmp_path / "bad.jsonl", ["{", "[1,"]))
    with pytest.raises(RmDataError, match="no such file"):
        read_rm_data(tmp_path / "missing.jsonl")


def test_the_gold_preference_ranks_concise_over_rambling_over_wrong_and_ties_go_unlabelled():
    order = ["52", "52 and so", "62", "62 and so on"]
    golds = [gold_reward(r, "52") for r in order]
    assert golds == sorted(golds, reverse=True) and len(set(golds)) == len(golds)
    assert gold_reward("53", "52") == gold_reward("99", "52") == 0.0  # ties: both wrong
    tie = type("P", (), {"prompt": "40+12=", "answer": "52"})()
    import random

    assert label_pairs([tie], [["53", "99", "98", "52"]], 10, 0.1, random.Random(0), False) == [
        label_pairs([tie], [["53", "52"]], 10, 0.0, random.Random(0), False)[0]]
    problem = type("P", (), {"prompt": "40+12=", "answer": "52"})()
    import random

    exact = label_pairs([problem] * 200, [["62", "52"]] * 200, 1000, 0.0, random.Random(0), False)
    assert all(p.chosen == "52" for p in exact)  # temperature 0: raters always pick the better
    noisy = label_pairs([problem] * 400, [["62", "52"]] * 400, 1000, 0.5, random.Random(0), False)
    wrong = sum(p.chosen == "62" for p in noisy) / len(noisy)
    expected = 1 / (1 + math.exp((gold_reward("52", "52") - gold_reward("62", "52")) / 0.5))
    assert abs(wrong - expected) < 0.07  # Bradley-Terry noise at the configured temperature


@pytest.mark.parametrize("loss", ["pairwise", "pointwise"])
def test_train_rm_learns_the_preference_and_writes_a_model_the_scorer_loads(tmp_path, loss):
    base = build_tiny_model(tmp_path / "base")
    if loss == "pairwise":
        rows = _pairs(60) + [{"prompt": "x", "chosen": "a"}]  # one bad row, counted
    else:
        rows = [{"prompt": f"{i:02d}+{i:02d}=", "response": f"{i}{d}", "score": float(d == 7)}
                for i in range(60) for d in (3, 7)] + [{"prompt": "x", "response": "a"}]
    data = _write(tmp_path / "d.jsonl", rows)
    out = tmp_path / "rm"
    rc = main(["train-rm", "configs/default.yaml", f"model.path={base}", f"rm.data={data}",
               f"rm.out={out}", "rm.steps=30", "rm.eval_interval=15", "rm.lr=1e-3",
               "rm.batch_size=16", "rm.eval_fraction=0.2"])
    assert rc == 0
    summary = json.loads((out / "train_rm.json").read_text())
    assert summary["kind"] == loss and sum(summary["skipped"].values()) == 1
    assert summary["held_out_accuracy"] >= 0.9, summary
    assert (out / "rm.png").stat().st_size > 0
    assert [json.loads(x)["step"] for x in (out / "rm_metrics.jsonl").read_text().splitlines()] == \
        [0, 15, 30]
    scorer = RewardModelScorer(out)
    hi, lo = scorer.score(["98+98="] * 2, ["987", "983"])
    assert hi > lo


def test_train_rm_refuses_a_bad_config_and_a_missing_base(tmp_path, capsys):
    with pytest.raises(Exception, match="rm.loss"):
        load_config("configs/default.yaml", ["rm.loss=hinge"])
    data = _write(tmp_path / "d.jsonl", _pairs(4))
    assert main(["train-rm", "configs/default.yaml", f"model.path={tmp_path}",
                 f"rm.data={data}", f"rm.out={tmp_path / 'o'}"]) == 2
    assert "model.path" in capsys.readouterr().err


def test_a_causal_lm_or_a_many_label_classifier_is_refused_as_the_reward_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(Exception, match="task.reward_model=.* is a LlamaForCausalLM, not a rew"):
        load_config(None, [f"task.reward_model={tmp_path}"])
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForSequenceClassification"], "id2label": {"0": "a", "1": "b"}}))
    with pytest.raises(Exception, match="has 2 labels; a reward model has 1"):
        load_config(None, [f"task.reward_model={tmp_path}"])
    (tmp_path / "config.json").write_text("[not an object")
    with pytest.raises(Exception, match="does not read as a JSON object"):
        load_config(None, [f"task.reward_model={tmp_path}"])


def test_the_exact_base_is_the_policy_built_without_its_slipping_teacher(monkeypatch, tmp_path):
    """rm.base=builtin:policy-exact builds (once, cached) the run's tiny builtin with
    task.carry_slip and warm_start.slip_steps off: the model `asyncrl prepare` builds for
    `task.carry_slip=0 warm_start.slip_steps=0`, and nothing else of the run changes."""
    from asyncrl.rm import train
    from asyncrl.task import tiny_model

    cfg = load_config("configs/rlhf.yaml", ["rm.base=builtin:policy-exact",
                                            f"warm_start.cache_dir={tmp_path}"])
    built = []
    monkeypatch.setattr(tiny_model, "prepare_builtin",
                        lambda c, progress: built.append(c) or tmp_path / "exact")
    assert train.exact_base(cfg, "builtin:tiny-addition") == str(tmp_path / "exact")
    asked = load_config("configs/rlhf.yaml", ["task.carry_slip=0", "warm_start.slip_steps=0",
                                              f"warm_start.cache_dir={tmp_path}"])
    assert tiny_model.cache_key(built[0]) == tiny_model.cache_key(asked)
    assert tiny_model.cache_key(built[0]) != tiny_model.cache_key(cfg)
    assert cfg.task.carry_slip == 0.6 and cfg.rm.base == "builtin:policy-exact"


def test_rm_base_names_its_builtin_and_needs_a_tiny_builtin_policy(tmp_path):
    with pytest.raises(Exception, match="rm.base='builtin:nope': the builtin is builtin:policy"):
        load_config("configs/rlhf.yaml", ["rm.base=builtin:nope"])
    build_tiny_model(tmp_path)
    with pytest.raises(Exception, match="rm.base='builtin:policy-exact' is a tiny builtin"):
        load_config("configs/rlhf.yaml", ["rm.base=builtin:policy-exact",
                                          f"model.path={tmp_path}"])


def test_rm_sample_temperature_samples_the_training_pairs_and_not_the_held_out_ones(monkeypatch):
    from asyncrl.rm import gold

    asked = []

    def fake(policy_dir, prompts, k, max_tokens, seed, progress=print, temperature=1.0,
             who=""):
        asked.append((len(prompts), temperature))  # one right answer, k - 1 wrong ones
        return [[str(sum(map(int, p.rstrip("=").split("+"))))] + ["x"] * (k - 1) for p in prompts]

    monkeypatch.setattr(gold, "sample_responses", fake)
    cfg = load_config("configs/rlhf.yaml", ["rm.pairs=40", "rm.sample_temperature=1.5",
                                            "task.eval_size=16"])
    train, held = gold.make_preferences(cfg, "unused")
    assert len(train) == 40 and held
    assert [t for _, t in asked] == [1.5, 1.0]  # the training prompts, then the held-out ones
    with pytest.raises(Exception, match="rm.sample_temperature"):
        load_config("configs/rlhf.yaml", ["rm.sample_temperature=0"])


def test_loading_a_base_prints_no_load_report_about_the_new_head(tmp_path, capfd):
    """transformers' load report calls the fresh scalar head MISSING and the dropped lm_head
    UNEXPECTED: expected for a reward model, and alarming in a newcomer's first RLHF run."""
    from asyncrl.rm.train import load_base

    build_tiny_model(tmp_path)
    model, _ = load_base(str(tmp_path))
    out = capfd.readouterr()
    assert model.config.num_labels == 1
    assert "MISSING" not in out.out + out.err and "UNEXPECTED" not in out.out + out.err


def test_a_resolved_rlhf_config_saves_and_loads_again(monkeypatch, tmp_path):
    """asyncrl run saves the resolved config (model.path a directory) and every role loads it
    again: rm.base=builtin:policy-exact must have become a directory too, or the roles refuse
    it (it did, after a whole reward model had been built)."""
    from asyncrl.config import save_config
    from asyncrl.rm import builtin, train
    from asyncrl.runner import resolve_model
    from asyncrl.task import tiny_model

    policy_dir = build_tiny_model(tmp_path / "policy")
    monkeypatch.setattr(tiny_model, "prepare_builtin", lambda c, progress: policy_dir)
    monkeypatch.setattr(builtin, "prepare_builtin_rm",
                        lambda c, policy, progress: tmp_path / "rm")
    cfg = load_config("configs/rlhf.yaml", [f"warm_start.cache_dir={tmp_path}"])
    resolved = resolve_model(cfg, lambda _: None)
    assert resolved.rm.base == train.exact_base_dir(
        load_config("configs/rlhf.yaml", [f"warm_start.cache_dir={tmp_path}"]),
        "builtin:tiny-addition")
    assert resolved.rm.base.startswith(str(tmp_path / "tiny-addition-"))
    monkeypatch.setattr("asyncrl.config.checks._reward_model_errors", lambda rm: [])
    save_config(resolved, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml").rm.base == resolved.rm.base
