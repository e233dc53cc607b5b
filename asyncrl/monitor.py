"""Every figure a run produces leaves it through one interface, `Monitor`: log a row of
numbers at a step, log the config, log a file (a plot), finish.

Two places write, and neither waits on the other:
  - Rank 0 of the learner writes one row per step with `JsonlMonitor` (RUN_DIR/metrics.jsonl;
    the row layout is in docs/metrics.md). That is the run's record: resume, the launcher's
    progress lines, the plots and the studies read it.
  - The trackers named in run.trackers (`tensorboard`, `wandb`, `mlflow`) are fed by
    `TrackerFeed`, a thread of the launcher (`asyncrl run`): it tails metrics.jsonl, scrapes
    the buffer's, generators' and evaluator's Prometheus endpoints every
    run.tracker_interval_s into one row for all of them (`role_figures`: counters summed over
    the generators, gauges averaged, so the rate does not grow with their number), and hands
    both to every tracker, with the config at the start and the plots at the end.
No tracker call runs in a learner process, so a slow or failing tracker cannot slow a step,
and the feed's thread runs at a lower priority (nice 10, and so do the processes it starts).

A tracker named but not installed is reported in one line and left out; one that raises
(network down, disk full) is reported once and left out for the rest of the run. Neither
stops the run: metrics.jsonl has every row.

Steps and restarts. A tracker sees each learner step once, in order: a restarted learner
rewrites the rows after its checkpoint (the replayed steps), and the feed skips every row at
or below the newest step it has logged (RUN_DIR/trackers/state.json keeps it, with the wandb
and MLflow run ids, so `asyncrl run` resuming a stopped run continues the same tracker runs).
The values a tracker keeps for a replayed step are the first ones written. Rows of the other
roles are logged at the newest learner step logged (wandb refuses a step lower than one it
has, so nothing is ever logged below it).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from asyncrl.jsonl import Tail
from asyncrl.trackers import TrackerSettings, open_trackers

log = logging.getLogger(__name__)

PLOTS = ("curves.png", "lengths.png", "episodes.png")


class Monitor(Protocol):
    name: str

    def log(self, row: dict, step: int) -> None: ...

    def log_config(self, config: dict) -> None: ...

    def log_file(self, path: Path, step: int) -> None: ...

    def finish(self) -> None: ...


class JsonlMonitor:
    """RUN_DIR/metrics.jsonl: one JSON object per line, appended and flushed per row (a reader
    skips a torn last line, asyncrl/jsonl.py). The config and the plots are files of the run
    directory already (config.yaml, curves.png), so those calls write nothing."""

    name = "jsonl"

    def __init__(self, path: Path):
        self.path = Path(path)

    def log(self, row: dict, step: int) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **row}) + "\n")

    def log_config(self, config: dict) -> None:
        pass

    def log_file(self, path: Path, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


# ---------------------------------------------------------------------- rows for trackers

def numeric(row: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics row, nested dicts flattened to `key/sub` (staleness_tokens/2);
    None, text and the step itself are left out."""
    out: dict[str, float] = {}
    for k, v in row.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(numeric(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and key != "step":
            out[key] = float(v)
    return out


# ---------------------------------------------------------------------- other roles' figures

def role_figures(role: str, pages: list[str]) -> dict[str, float]:
    """One row from the Prometheus pages of the processes of one role: each asyncrl_* series
    summed over its labels; then counters summed over the processes and gauges averaged;
    a histogram gives its mean (`_mean`) and count. Keys are `<role>/<name>` without the
    `asyncrl_<role>_` prefix."""
    from prometheus_client.parser import text_string_to_metric_families

    sums: dict[str, list[float]] = {}
    gauges: set[str] = set()
    for page in pages:
        mine: dict[str, float] = {}
        for fam in text_string_to_metric_families(page):
            for s in fam.samples:
                if not s.name.startswith("asyncrl_") or s.name.endswith(("_bucket", "_created")):
                    continue
                key = _figure_key(role, s.name)
                mine[key] = mine.get(key, 0.0) + s.value
                if fam.type == "gauge":
                    gauges.add(key)
        for k, v in mine.items():
            sums.setdefault(k, []).append(v)
    row = {k: (sum(v) / len(v) if k in gauges else sum(v)) for k, v in sums.items()}
    for k in [k for k in row if k.endswith("_sum")]:
        base = k.removesuffix("_sum")
        count = row.pop(base + "_count", 0.0)
        total = row.pop(k)
        row[base + "_count"] = count
        if count:
            row[base + "_mean"] = total / count
    return row


def _figure_key(role: str, name: str) -> str:
    own = f"asyncrl_{role}_"
    return f"{role}/{name.removeprefix(own) if name.startswith(own) else name[8:]}"


def scrape(url: str, timeout_s: float = 2.0) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.read().decode(errors="replace")
    except (OSError, http.client.HTTPException, ValueError):
        return None  # a role starting, restarting or stopping: missing from this row


def scrape_targets(cfg) -> dict[str, list[str]]:
    """The Prometheus endpoints of the roles `asyncrl run` starts on this host, by role."""
    host = cfg.net.bind_host if cfg.net.bind_host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    url = f"http://{host}:{{}}/metrics".format
    targets = {"buffer": [url(cfg.net.buffer_metrics_port)],
               "generator": [url(cfg.net.generator_metrics_port(i))
                             for i in range(cfg.generator.num_generators)]}
    if cfg.generator.eval_engine:
        targets["evaluator"] = [url(cfg.net.evaluator_metrics_port)]
    if cfg.reward.service:
        targets["reward"] = [url(cfg.net.reward_metrics_port)]
    return targets


# ---------------------------------------------------------------------- the feed

class TrackerFeed:
    """The launcher's thread that feeds the trackers (see the module docstring)."""

    def __init__(self, run_dir: Path, settings: TrackerSettings, config: dict,
                 targets: dict[str, list[str]], out: Callable[[str], None] = print,
                 fetch: Callable[[str], str | None] = scrape):
        self.run_dir, self.settings, self.config = Path(run_dir), settings, config
        self.targets, self.out, self.fetch = targets, out, fetch
        self.dir = self.run_dir / "trackers"
        self.state_path = self.dir / "state.json"
        self.state = _read_state(self.state_path)
        self.tail = Tail(self.run_dir / "metrics.jsonl")
        self.trackers: list[Monitor] = []
        self.last_scrape = 0.0
        self.last_counts: dict[str, tuple[float, float]] = {}  # key -> (value, time)
        self._stop = threading.Event()
        self.ready = threading.Event()  # the trackers are open (or reported missing)
        self._failed = False  # the feed's own failure was reported
        self._thread: threading.Thread | None = None

    @property
    def upto(self) -> int:
        """The newest learner step every tracker has logged."""
        return self.state.get("upto", -1)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="trackers", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 60.0) -> None:
        """Log what is left (the last rows, the plots), finish every tracker, and wait for
        that up to timeout_s (a tracker that hangs is abandoned, never waited on forever)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                self.out(f"[run] the trackers did not finish within {timeout_s:.0f}s; left")

    def _run(self) -> None:
        _lower_priority()  # before the trackers start their own processes (wandb-core)
        self.trackers = open_trackers(self.settings.names, self.run_dir, self.settings,
                                      self.state, self.out)
        self._save()
        self._each("log_config", self.config)
        self.ready.set()
        while not self._stop.wait(min(1.0, self.settings.interval_s)):
            self._pump_safely()
        self._pump_safely(final=True)
        self._each("finish")

    def _pump_safely(self, final: bool = False) -> None:
        """`pump`, where anything unexpected is reported once and the feed goes on: the
        trackers never stop a run, and neither does their feed."""
        try:
            self.pump(final)
        except Exception as e:  # noqa: BLE001 - the feed's own failure, never the run's
            if not self._failed:
                self._failed = True
                self.out(f"[run] the trackers' feed failed ({type(e).__name__}: {e}); it goes "
                         "on (metrics.jsonl has every row)")
            log.warning("tracker feed: %s", e, exc_info=True)

    def pump(self, final: bool = False) -> None:
        """Log the learner rows written since the last call, the other roles' figures when
        run.tracker_interval_s has passed, and at the end the plots."""
        for row in self.tail.new_rows():
            step = row.get("step")
            if not isinstance(step, int) or step <= self.upto:
                continue  # a replayed step after a learner restart: logged already
            self._each("log", numeric(row), step)
            self.state["upto"] = step
        now = time.monotonic()
        if final or now - self.last_scrape >= self.settings.interval_s:
            self.last_scrape = now
            row = self.figures(now)
            if row:
                self._each("log", row, max(self.upto, 0))
        if final and (self.run_dir / "summary.json").is_file():
            for plot in PLOTS:
                if (self.run_dir / plot).is_file():
                    self._each("log_file", self.run_dir / plot, max(self.upto, 0))
        self._save()

    def figures(self, now: float) -> dict[str, float]:
        """One row of the other roles' figures, with the generators' token rate."""
        row: dict[str, float] = {}
        for role, urls in self.targets.items():
            pages = [p for p in map(self.fetch, urls) if p is not None]
            try:
                row.update(role_figures(role, pages) if pages else {})
            except ValueError as e:  # a page cut short as its role stopped
                log.info("skipped %s's figures this time (%s)", role, e)
        key = "generator/generated_tokens_total"
        if key in row:
            before = self.last_counts.get(key)
            if before is not None and now > before[1] and row[key] >= before[0]:
                row["generator/tokens_per_s"] = (row[key] - before[0]) / (now - before[1])
            self.last_counts[key] = (row[key], now)
        return row

    def _each(self, method: str, *args) -> None:
        for t in list(self.trackers):
            try:
                getattr(t, method)(*args)
            except Exception as e:  # noqa: BLE001 - a tracker never stops the run
                self.trackers.remove(t)
                self.out(f"[run] tracker {t.name} failed ({type(e).__name__}: {e}); it is off for "
                         "the rest of the run (metrics.jsonl has every row)")

    def _save(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.state))
            os.replace(tmp, self.state_path)
        except OSError as e:
            log.warning("could not write %s (%s)", self.state_path, e)


def _lower_priority(niceness: int = 10) -> None:
    """This thread (and the processes it starts) yields the CPU to training: on Linux a
    thread's nice value is its own. Nowhere else does it matter; failures are ignored."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError):
        pass


def _read_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}
