"""The pure parts of benchmarks/async_vs_sync.py: joining checkpoint evaluations into a run."""

import json

from benchmarks.async_vs_sync import POSTHOC, Run, join_posthoc


def _rows():
    return [{"step": 0, "elapsed_s": 0.0, "eval_accuracy": 0.2},
            *({"step": k, "elapsed_s": 10.0 * k} for k in range(1, 4)),
            {"step": 4, "elapsed_s": 40.0, "eval_accuracy": 0.5}]


def test_checkpoint_accuracies_replace_the_loops_after_step_0():
    rows = _rows()
    join_posthoc(rows, {2: 0.4, 4: 0.55})
    assert rows[0]["eval_accuracy"] == 0.2  # the SFT policy's row keeps its evaluation
    assert [r.get("eval_accuracy") for r in rows[1:]] == [None, 0.4, None, 0.55]
    assert rows[4]["inloop_accuracy"] == 0.5  # kept beside it, as the check


def test_run_load_reads_the_checkpoint_evaluations_and_time_to_target_uses_them(tmp_path):
    d = tmp_path / "2-sync-seed1"
    d.mkdir()
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    (d / "bench_watch.json").write_text(json.dumps({"samples": [], "row_seen": {}}))
    run = Run.load(d)
    assert (run.order, run.setting, run.seed) == (2, "sync", 1)
    assert run.to_target(0.45) == (4, 40.0)  # in-loop: only the last row
    (d / POSTHOC).write_text(json.dumps({"2": 0.46, "4": 0.5}))
    assert Run.load(d).to_target(0.45) == (2, 20.0)
    assert run.threads() is None  # no config.yaml
    (d / "config.yaml").write_text("learner:\n  threads: 2\ngenerator:\n  threads: 1\n")
    assert run.threads() == {"learner": 2, "generator": 1}


def test_trained_tokens_per_s_weighs_completions_by_length(tmp_path):
    d = tmp_path / "1-ms2-none-seed0"
    d.mkdir()
    rows = [{"step": 0, "elapsed_s": 0.0},
            {"step": 1, "elapsed_s": 5.0, "tokens": 300, "samples_trained": 10},
            {"step": 2, "elapsed_s": 10.0, "tokens": 700, "samples_trained": 20}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "bench_watch.json").write_text(json.dumps({"samples": [], "row_seen": {}}))
    run = Run.load(d)
    assert run.trained_tokens_per_s() == 100.0  # row 0 (the SFT policy) trains nothing
    assert run.samples_per_s() == 2.0


def test_only_complete_checkpoints_are_evaluated(tmp_path):
    from benchmarks.async_vs_sync import _checkpoints

    for step, complete in ((10, True), (20, False), (30, True)):
        d = tmp_path / "checkpoints" / f"step_{step}"
        d.mkdir(parents=True)
        if complete:
            (d / "asyncrl_state.json").write_text("{}")
    (tmp_path / "checkpoints" / ".step_40.tmp").mkdir()
    assert [s for s, _ in _checkpoints(tmp_path)] == [10, 30]


def test_sync_threads_go_to_both_roles_of_the_sync_side_only():
    from asyncrl.study import grid
    from benchmarks.async_vs_sync import side_overrides

    sync, async_ = grid([2], ["none"])
    assert side_overrides(sync, 2)[-2:] == ["learner.threads=2", "generator.threads=2"]
    assert side_overrides(async_, 2) == list(async_.overrides)
    assert side_overrides(sync, 1) == list(sync.overrides)


def test_a_bad_side_override_stops_before_any_run(tmp_path):
    import pytest

    from benchmarks.async_vs_sync import main

    with pytest.raises(SystemExit, match="(?s)sync side.*learner.threads=0"):
        main(["--sync-threads", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="(?s)ms2-bogus side.*offpolicy"):
        main(["--correction", "bogus", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # nothing started
