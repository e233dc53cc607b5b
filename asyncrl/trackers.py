"""The experiment trackers run.trackers names, each a Monitor (asyncrl/monitor.py): TensorBoard
event files, a wandb run and an MLflow run, opened by `open_trackers`, which reports a tracker
not installed or failing to start in one line and leaves it out. They write under
RUN_DIR/trackers/; the launcher's TrackerFeed is their only caller."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

INSTALL = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}


def flat_config(config: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return out


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
                  out: Callable[[str], None]) -> list:
    """The trackers that open (each a Monitor); one line for each that is not installed or
    fails to start."""
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
