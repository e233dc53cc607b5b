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
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from asyncrl.jsonl import Tail

log = logging.getLogger(__name__)

PLOTS = ("curves.png", "lengths.png", "episodes.png")
INSTALL = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}


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


def flat_config(config: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return out


# ---------------------------------------------------------------------- the trackers

class TensorBoard:
    """Event files in RUN_DIR/trackers/tensorboard (`tensorboard --logdir RUN_DIR/trackers`)."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, settings: TrackerSettings, state: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / "trackers" / "tensorboard"))

    def log(self, row: dict, step: int) -> None:
        for k, v in row.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def log_config(self, config: dict) -> None:
        text = "\n".join(f"    {k}: {v}" for k, v in flat_config(config).items())
        self.writer.add_text("config", text)

    def log_file(self, path: Path, step: int) -> None:
        import matplotlib.image

        self.writer.add_image(Path(path).stem, matplotlib.image.imread(str(path))[..., :3],
                              step, dataformats="HWC")

    def finish(self) -> None:
        self.writer.close()


class Wandb:
    """A wandb run, in RUN_DIR/trackers/wandb. run.wandb_mode=auto is online when
    WANDB_API_KEY is set and offline otherwise (`wandb sync` uploads an offline run later)."""

    name = "wandb"

    def __init__(self, run_dir: Path, settings: TrackerSettings, state: dict):
        import wandb

        mode = settings.wandb_mode
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        run_id = state.setdefault("wandb_id", uuid.uuid4().hex[:8])
        self.run = wandb.init(project=settings.project, name=Path(run_dir).name, id=run_id,
                              dir=str(Path(run_dir) / "trackers"), mode=mode, resume="allow",
                              reinit="create_new",
                              # no console capture, no system-metrics sampler: the learner's
                              # processes are not this one's, and sampling costs CPU there
                              settings=wandb.Settings(silent=True, console="off",
                                                      x_disable_stats=True))
        self.wandb = wandb

    def log(self, row: dict, step: int) -> None:
        self.run.log(row, step=step)

    def log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_file(self, path: Path, step: int) -> None:
        self.run.log({Path(path).stem: self.wandb.Image(str(path))}, step=step)

    def finish(self) -> None:
        self.run.finish()


class Mlflow:
    """An MLflow run: a local file store in RUN_DIR/trackers/mlruns unless run.mlflow_uri
    names a tracking server (`mlflow ui --backend-store-uri RUN_DIR/trackers/mlruns`)."""

    name = "mlflow"

    def __init__(self, run_dir: Path, settings: TrackerSettings, state: dict):
        # MLflow 3 keeps the file store but asks for this to use it: it needs no database.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        uri = settings.mlflow_uri or (Path(run_dir) / "trackers" / "mlruns").resolve().as_uri()
        self.client = MlflowClient(uri)
        exp = self.client.get_experiment_by_name(settings.project)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(settings.project)
        self.run_id = state.get("mlflow_run_id")
        if self.run_id is None:
            self.run_id = self.client.create_run(exp_id, run_name=Path(run_dir).name).info.run_id
            state["mlflow_run_id"] = self.run_id
            self.fresh = True
        else:
            self.client.update_run(self.run_id, status="RUNNING")
            self.fresh = False

    def log(self, row: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k.replace("/", "."), v, now, step) for k, v in row.items()]
        for i in range(0, len(metrics), 500):  # the store's limit per call is 1000
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 500])

    def log_config(self, config: dict) -> None:
        from mlflow.entities import Param

        if not self.fresh:  # parameters cannot change; a resumed run logged them already
            return
        params = [Param(k, v[:6000]) for k, v in flat_config(config).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log_file(self, path: Path, step: int) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def finish(self) -> None:
        self.client.set_terminated(self.run_id)


OPENERS: dict[str, Callable] = {"tensorboard": TensorBoard, "wandb": Wandb, "mlflow": Mlflow}


class TrackerSettings:
    """What the trackers take from the config (run.*)."""

    def __init__(self, names: list[str], project: str = "asyncrl", wandb_mode: str = "auto",
                 mlflow_uri: str = "", interval_s: float = 10.0):
        self.names, self.project, self.wandb_mode = list(names), project, wandb_mode
        self.mlflow_uri, self.interval_s = mlflow_uri, interval_s

    @classmethod
    def of(cls, cfg) -> TrackerSettings:
        r = cfg.run
        return cls(list(r.trackers), r.tracker_project, r.wandb_mode, r.mlflow_uri,
                   r.tracker_interval_s)


def open_trackers(names: list[str], run_dir: Path, settings: TrackerSettings, state: dict,
                  out: Callable[[str], None]) -> list[Monitor]:
    """The trackers that open; one line for each that is not installed or fails to start."""
    opened = []
    for name in names:
        try:
            opened.append(OPENERS[name](run_dir, settings, state))
        except ImportError as e:
            out(f"[run] tracker {name} is in run.trackers but not installed ({e}); the run goes "
                f"on without it (pip install {INSTALL[name]}, or scripts/install.sh "
                f"--trackers {name})")
        except Exception as e:  # noqa: BLE001 - any tracker failure is reported, never fatal
            out(f"[run] tracker {name} could not start ({type(e).__name__}: {e}); the run goes "
                "on without it")
    return opened


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
