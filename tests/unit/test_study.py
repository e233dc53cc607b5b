"""The staleness study's grid, resume and report, on fabricated finished runs."""

import csv
import json

from asyncrl.config import load_config
from asyncrl.study import grid, run_sweep, write_report


def _fake_run(d, acc0, acc1, staleness):
    d.mkdir(parents=True)
    rows = [{"step": 0, "eval_accuracy": acc0, "elapsed_s": 0.0}]
    for s in (1, 2, 3, 4):
        rows.append({"step": s, "elapsed_s": 10.0 * s, "samples_trained": 64 * s,
                     "stale_dropped_total": 8 * s, "reward_mean": 0.5, "staleness_mean": staleness,
                     "staleness_tokens": {str(staleness): 100}, "is_ess": 0.9,
                     "tokens_per_s": 400.0, "tokens": 64 * staleness + 640, **({"eval_accuracy": acc0 + (acc1 - acc0) * s / 4}
                                               if s % 2 == 0 else {})})
    (d / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)))
    (d / "summary.json").write_text("{}")


def test_grid_has_a_sync_baseline_and_every_combination():
    settings = grid([0, 2], ["none", "tis"])
    assert [s.name for s in settings] == ["sync", "ms0-none", "ms0-tis", "ms2-none", "ms2-tis"]
    for s in settings:  # every setting is a valid config
        load_config("configs/default.yaml", list(s.overrides))
    assert "buffer.admit_steps=2" in grid([2], ["none"])[1].overrides


def test_report_tables_and_plots(tmp_path):
    settings = grid([2], ["none"])
    _fake_run(tmp_path / "sync-seed0", 0.5, 0.9, 0)
    _fake_run(tmp_path / "ms2-none-seed0", 0.5, 0.7, 2)
    report = write_report(tmp_path, settings, seeds=1, target=0.8)
    rows = list(csv.DictReader((report / "runs.csv").open()))
    assert {r["setting"] for r in rows} == {"sync", "ms2-none"} and len(rows) == 10
    summary = (report / "summary.md").read_text()
    sync_line = next(x for x in summary.splitlines() if x.startswith("| sync"))
    assert "0.900" in sync_line and "| 40 |" in sync_line  # evals: 0.7 at t=20, 0.9 at t=40
    assert "not reached" in next(x for x in summary.splitlines() if x.startswith("| ms2-none"))
    assert "11.1%" in sync_line  # 32 dropped of 288 generated
    cells = [c.strip() for c in sync_line.strip("|").split("|")]
    assert cells[4] == "0.700"  # worst evaluation after step 0 (0.7 at step 2; 0.5 is step 0)
    assert cells[7] == "10.0"  # 4 x 640 completion tokens over 256 completions trained
    ms2 = [c.strip() for c in summary.splitlines()[3].strip("|").split("|")]
    assert ms2[0] == "ms2-none" and ms2[7] == "12.0"  # (640 + 128) x 4 / 256
    for png in ("accuracy_reward.png", "staleness_ess.png"):
        assert (report / png).stat().st_size > 10_000


def test_sweep_resumes_finished_runs_without_rerunning(tmp_path, monkeypatch):
    settings = grid([2], ["none"])
    _fake_run(tmp_path / "sync-seed0", 0.5, 0.9, 0)
    _fake_run(tmp_path / "ms2-none-seed0", 0.5, 0.7, 2)
    (tmp_path / "sync-seed1").mkdir()  # an unfinished run: must be redone from scratch
    (tmp_path / "sync-seed1" / "junk").write_text("x")
    started = []

    def fake_execute(cfg, out=print):
        from pathlib import Path

        started.append(Path(cfg.run_dir).name)
        assert not (Path(cfg.run_dir) / "junk").exists()
        _fake_run(Path(cfg.run_dir), 0.5, 0.8, 0) if not Path(cfg.run_dir).exists() else None
        return 0

    monkeypatch.setattr("asyncrl.runner.execute_run", fake_execute)
    run_sweep("configs/default.yaml", [], settings, seeds=2, out_dir=tmp_path, target=0.8,
              progress=lambda _: None)
    assert started == ["sync-seed1", "ms2-none-seed1"]
