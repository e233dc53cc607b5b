"""One road out for metrics (asyncrl/monitor.py): the metrics.jsonl writer, the feed that
tails it into the trackers across learner restarts, the other roles' figures, and the three
real trackers read back with their own readers."""

import json
import sys
import time

import pytest

from asyncrl.monitor import JsonlMonitor, TrackerFeed, numeric, role_figures
from asyncrl.trackers import TrackerSettings, open_trackers
from tests.helpers.trackers import mlflow_series, tensorboard_series, wandb_series


class Recorder:
    name = "recorder"

    def __init__(self, fail_on: str | None = None):
        self.calls, self.fail_on = [], fail_on

    def _note(self, *call):
        if call[0] == self.fail_on:
            raise OSError("disk full")
        self.calls.append(call)

    def log(self, row, step):
        self._note("log", step, dict(row))

    def log_config(self, config):
        self._note("log_config", config)

    def log_file(self, path, step):
        self._note("log_file", path.name, step)

    def finish(self):
        self._note("finish")


def _write(path, steps, **extra):
    m = JsonlMonitor(path)
    for s in steps:
        m.log({"reward_mean": s / 10, "eval_accuracy": None if s % 2 else s / 20,
               "tokens_per_s": 100.0 + s, "staleness_tokens": {"0": 3, "1": 1},
               "eval_by": "gen0", **extra}, s)


def _feed(tmp_path, trackers, fetch=lambda url: None, targets=None):
    feed = TrackerFeed(tmp_path, TrackerSettings([], interval_s=3600), {"learner": {"lr": 1}},
                       targets or {}, out=lambda line: None, fetch=fetch)
    feed.trackers = trackers
    return feed


def test_jsonl_monitor_writes_one_row_per_line_with_the_step_first(tmp_path):
    _write(tmp_path / "metrics.jsonl", [0, 1])
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [list(r)[0] for r in rows] == ["step", "step"]
    assert [r["step"] for r in rows] == [0, 1] and rows[0]["eval_accuracy"] == 0.0


def test_numeric_keeps_numbers_and_flattens_dicts():
    assert numeric({"step": 3, "a": 1, "b": None, "c": "gen0", "d": True,
                    "e": {"0": 2, "x": {"y": 1.5}}}) == {"a": 1.0, "e/0": 2.0, "e/x/y": 1.5}


def test_the_feed_logs_each_step_once_in_order_across_a_learner_restart(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rec = Recorder()
    feed = _feed(tmp_path, [rec])
    _write(path, range(0, 7))
    feed.pump()
    # The learner restarts from its checkpoint at step 4: the file is rewritten up to 4 and
    # the replayed steps 5.. are written again, with other values (elapsed time differs).
    path.write_text("".join(x + "\n" for x in path.read_text().splitlines()[:5]))
    _write(path, range(5, 10), replayed=1)
    feed.pump()
    steps = [c[1] for c in rec.calls if c[0] == "log"]
    assert steps == list(range(10))
    replayed = {c[1]: c[2] for c in rec.calls if c[0] == "log"}
    assert "replayed" not in replayed[6] and replayed[8]["replayed"] == 1.0
    assert replayed[2]["eval_accuracy"] == 0.1 and "eval_accuracy" not in replayed[3]
    assert replayed[2]["staleness_tokens/1"] == 1.0 and "eval_by" not in replayed[2]

    # `asyncrl run` resuming the stopped run starts a new feed: it goes on after step 9.
    rec2 = Recorder()
    feed2 = _feed(tmp_path, [rec2])
    _write(path, [10])
    feed2.pump()
    assert [c[1] for c in rec2.calls if c[0] == "log"] == [10]


def test_a_failing_tracker_is_reported_once_and_the_others_go_on(tmp_path):
    lines = []
    bad, good = Recorder(fail_on="log"), Recorder()
    feed = _feed(tmp_path, [bad, good])
    feed.out = lines.append
    _write(tmp_path / "metrics.jsonl", range(3))
    feed.pump()
    _write(tmp_path / "metrics.jsonl", range(3, 5))
    feed.pump()
    assert len(lines) == 1 and "recorder failed (OSError: disk full)" in lines[0]
    assert [c[1] for c in good.calls if c[0] == "log"] == [0, 1, 2, 3, 4]


def test_a_tracker_not_installed_is_one_line_and_left_out(tmp_path, monkeypatch):
    for mod in ("wandb", "mlflow", "mlflow.tracking", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, mod, None)  # import raises ImportError
    lines = []
    opened = open_trackers(["tensorboard", "wandb", "mlflow"], tmp_path,
                           TrackerSettings(["tensorboard", "wandb", "mlflow"]), {}, lines.append)
    assert opened == []
    assert len(lines) == 3
    for name, line in zip(["tensorboard", "wandb", "mlflow"], lines):
        assert line.startswith(f"[run] tracker {name} is in run.trackers but not installed")


GEN = """# TYPE asyncrl_generator_generated_tokens_total counter
asyncrl_generator_generated_tokens_total {tokens}
# TYPE asyncrl_generator_inflight_sequences gauge
asyncrl_generator_inflight_sequences {inflight}
# TYPE asyncrl_generator_messages_rejected_total counter
asyncrl_generator_messages_rejected_total{{reason="bad_magic"}} 1.0
asyncrl_generator_messages_rejected_total{{reason="too_big"}} 2.0
# TYPE asyncrl_sync_receive_seconds histogram
asyncrl_sync_receive_seconds_bucket{{le="1.0"}} 2.0
asyncrl_sync_receive_seconds_bucket{{le="+Inf"}} 2.0
asyncrl_sync_receive_seconds_count 2.0
asyncrl_sync_receive_seconds_sum {sync}
"""


def test_role_figures_sum_counters_average_gauges_and_give_histogram_means():
    row = role_figures("generator", [GEN.format(tokens=100, inflight=8, sync=1.0),
                                     GEN.format(tokens=300, inflight=4, sync=3.0)])
    assert row["generator/generated_tokens_total"] == 400
    assert row["generator/inflight_sequences"] == 6
    assert row["generator/messages_rejected_total"] == 6
    assert row["generator/sync_receive_seconds_mean"] == 1.0
    assert row["generator/sync_receive_seconds_count"] == 4
    assert not any(k.endswith(("_bucket", "_sum")) for k in row)


def test_the_feed_logs_one_row_for_all_generators_at_the_newest_learner_step(tmp_path):
    pages = {"g0": GEN.format(tokens=100, inflight=8, sync=1.0),
             "g1": GEN.format(tokens=300, inflight=4, sync=3.0), "b": None}
    rec = Recorder()
    feed = _feed(tmp_path, [rec], fetch=pages.get,
                 targets={"generator": ["g0", "g1"], "buffer": ["b"]})
    _write(tmp_path / "metrics.jsonl", range(4))
    feed.pump(final=True)
    logged = [c for c in rec.calls if c[0] == "log"]
    assert [c[1] for c in logged] == [0, 1, 2, 3, 3]
    assert logged[-1][2]["generator/generated_tokens_total"] == 400
    assert not any(k.startswith("buffer/") for k in logged[-1][2])  # the buffer was down


@pytest.mark.parametrize("reader,name", [(tensorboard_series, "tensorboard"),
                                         (wandb_series, "wandb"), (mlflow_series, "mlflow")])
def test_each_real_tracker_holds_the_series_with_the_right_steps(tmp_path, reader, name):
    pytest.importorskip({"tensorboard": "tensorboard", "wandb": "wandb",
                         "mlflow": "mlflow"}[name])
    path = tmp_path / "metrics.jsonl"
    lines = []
    feed = TrackerFeed(tmp_path, TrackerSettings([name], wandb_mode="offline", interval_s=0.5),
                       {"learner": {"lr": 1e-3}}, {}, out=lines.append)
    feed.start()
    _write(path, range(0, 6))
    deadline = time.monotonic() + 60
    while feed.upto < 5:  # the feed's thread has logged steps 0..5
        assert time.monotonic() < deadline and feed._thread.is_alive(), lines
        time.sleep(0.1)
    path.write_text("".join(x + "\n" for x in path.read_text().splitlines()[:3]))
    _write(path, range(3, 9))  # a learner restart from step 2, replaying 3..5
    feed.stop()
    assert lines == []
    assert reader(tmp_path, "reward_mean") == [(s, pytest.approx(s / 10)) for s in range(9)]
    assert reader(tmp_path, "eval_accuracy") == [(s, pytest.approx(s / 20))
                                                 for s in range(0, 9, 2)]
    assert [s for s, _ in reader(tmp_path, "tokens_per_s")] == list(range(9))


def test_the_feed_survives_pages_cut_short_and_errors_of_its_own(tmp_path):
    import http.client

    def cut(url):
        raise http.client.IncompleteRead(b"# TYPE asyncrl_")

    lines = []
    rec = Recorder()
    feed = _feed(tmp_path, [rec], fetch=cut, targets={"generator": ["g0"]})
    feed.out = lines.append
    _write(tmp_path / "metrics.jsonl", range(2))
    feed._pump_safely(final=True)  # the fetch raising: reported once, the rows still logged
    feed._pump_safely(final=True)
    assert len(lines) == 1 and "feed failed (IncompleteRead" in lines[0]
    assert role_figures("generator", ["# TYPE x counter\nx_total 1\n"]) == {}
    bad = TrackerFeed(tmp_path, TrackerSettings([], interval_s=3600), {}, {"buffer": ["b"]},
                      out=lines.append, fetch=lambda url: "asyncrl_buffer_x{ 1\n")
    assert bad.figures(0.0) == {}  # a page cut mid-line: skipped, no exception
