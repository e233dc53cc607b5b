"""The run's plots: they are written without a display, and the length percentiles are right."""

import json

import numpy as np
import pytest

from asyncrl.plots import length_percentiles, plot_lengths, plot_run


def test_length_percentiles_match_numpy():
    lengths = [20] * 30 + [40] * 50 + [130] * 20
    got = length_percentiles(lengths)
    assert got == pytest.approx(dict(zip(("p10", "p50", "p90"),
                                         np.percentile(lengths, [10, 50, 90]))))
    assert length_percentiles([]) == {}


def test_plot_lengths_writes_a_png(tmp_path):
    out = plot_lengths([20, 21, 35, 40, 44, 130, 180], tmp_path / "lengths.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_lengths([], tmp_path / "empty.png").stat().st_size > 0


def test_curves_keep_rewards_above_one_on_the_chart(tmp_path):
    rows = [{"step": 0, "reward_mean": None, "eval_accuracy": 0.5},
            {"step": 1, "reward_mean": 3.2}, {"step": 2, "reward_mean": 3.6, "eval_accuracy": 0.6}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot_run(tmp_path / "metrics.jsonl", tmp_path / "curves.png").stat().st_size > 0


def test_episodes_png_only_for_runs_with_episodes(tmp_path):
    from asyncrl.plots import plot_episodes

    rows = [{"step": 0, "reward_mean": None, "eval_accuracy": 0.4},
            {"step": 1, "reward_mean": 0.5, "episode_turns": 2.5, "tool_success": 0.8},
            {"step": 2, "reward_mean": 0.6, "episode_turns": 3.0, "tool_success": 0.9,
             "eval_accuracy": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = plot_episodes(tmp_path / "metrics.jsonl", tmp_path / "episodes.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "plain.jsonl").write_text(json.dumps({"step": 1, "reward_mean": 0.5}) + "\n")
    assert plot_episodes(tmp_path / "plain.jsonl", tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
