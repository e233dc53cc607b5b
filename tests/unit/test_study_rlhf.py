"""asyncrl study rlhf's grid and report, on run directories written here: the settings it
makes, the sequence-level KL, where gold peaks and whether proxy and gold parted, and the
files a reader looks at. And the gold judge: a policy against itself ties every pair."""

import json

import pytest

from asyncrl.config import load_config, save_config
from asyncrl.study_rlhf import curve, grid, parted, write_report


def test_the_grid_crosses_reward_model_sizes_and_kl_coefficients_and_staleness_when_asked():
    names = [s.name for s in grid([0.05, 0.3], [500, 8000], None)]
    assert names == ["rm500-kl0.05", "rm500-kl0.3", "rm8000-kl0.05", "rm8000-kl0.3"]
    s = grid([0.1], [2000], [0, 4])
    assert [x.name for x in s] == ["rm2000-kl0.1-ms0", "rm2000-kl0.1-ms4"]
    assert s[1].overrides == ("rm.pairs=2000", "rm.rounds=0", "learner.kl_coef=0.1",
                              "buffer.max_staleness=4", "buffer.admit_steps=4")
    for x in s:  # every setting is a config that loads
        load_config("configs/rlhf.yaml", list(x.overrides))


def _rows(gold, proxy, kl=0.1):
    return [{"step": 0, "eval_accuracy": 0.4}] + [
        {"step": i + 1, "kl_ref": kl * i, "tokens": 300, "completions": 100,
         "reward_gold": g, "reward_reward_model": p} for i, (g, p) in enumerate(zip(gold, proxy))]


def test_gold_and_proxy_part_when_gold_falls_from_its_peak_while_proxy_rises():
    rise = [0.3 + 0.02 * i for i in range(20)]
    c = curve(_rows(rise, rise))
    assert c[0]["step"] == 1 and c[3]["kl_seq"] == pytest.approx(0.1 * 3 * 3.0)
    assert not parted(c)["parted"]
    over = [0.3 + 0.03 * i for i in range(10)] + [0.57 - 0.05 * i for i in range(10)]
    p = parted(curve(_rows(over, [0.1 * i for i in range(20)])))
    assert p["parted"] and 8 <= p["gold_peak_step"] <= 12


def test_the_report_has_the_plot_the_table_and_the_csv(tmp_path):
    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "train_rm.json").write_text(json.dumps({"held_out_accuracy": 0.861}))
    (rm / "config.json").write_text("{}")
    settings = grid([0.05], [500], None)
    run = tmp_path / f"{settings[0].name}-seed0"
    run.mkdir()
    save_config(load_config("configs/rlhf.yaml", [f"task.reward_model={rm}"]),
                run / "config.yaml")
    over = [0.3 + 0.03 * i for i in range(10)] + [0.57 - 0.05 * i for i in range(10)]
    (run / "metrics.jsonl").write_text("".join(
        json.dumps(r) + "\n" for r in _rows(over, [0.1 * i for i in range(20)])))
    (run / "summary.json").write_text("{}")
    (run / "win_rate.json").write_text(json.dumps({"win_rate": 0.61}))
    report = write_report(tmp_path, settings, 1)
    assert (report / "overoptimization.png").stat().st_size > 0
    text = (report / "summary.md").read_text()
    assert "| rm500-kl0.05 | 0 | 86.1% |" in text and "| yes | 61.0% |" in text, text
    assert len((report / "runs.csv").read_text().splitlines()) == 21


def test_a_policy_against_itself_ties_every_comparison(tmp_path):
    from asyncrl.rm.gold import win_rate
    from asyncrl.testing import build_tiny_model

    policy = build_tiny_model(tmp_path / "p")
    cfg = load_config("configs/rlhf.yaml", ["task.eval_size=16"])
    w = win_rate(str(policy), str(policy), cfg, samples=2)
    assert w["comparisons"] == 32 and w["wins"] == w["losses"] == 0 and w["win_rate"] == 0.5
