"""`asyncrl run`: start buffer, generators (and with generator.eval_engine the evaluator) and a
torchrun learner as separate processes.

Each role runs in its own process group, with its output in RUN_DIR/logs/<role>.log.
The launcher prints progress from RUN_DIR/metrics.jsonl and, with run.trackers, feeds the
experiment trackers from a thread (asyncrl/monitor.py).

Supervision: a buffer, generator, evaluator or reward service that dies is restarted, up to
run.max_role_restarts times per role (after run.restart_delay_s, doubling), which the roles
are built for: the buffer recovers what it acknowledged from its durable log, a restarted
generator is a new sender incarnation that the learner takes into a new weight-sync session,
a restarted evaluator answers the requests still unanswered in RUN_DIR/evals/, the
generators send a restarted reward service the score requests it had not answered. Each restart
is printed and counted (`asyncrl_run_role_restarts_total` on net.base_port + 5). The
learner has torchrun's own restarts (learner.max_restarts); if torchrun gives up, the run
ends.

When the learner finishes, a role is past its restart budget, or on Ctrl-C/SIGTERM, every
role's whole process group gets SIGTERM, then SIGKILL after a grace period, so no orphan (vLLM
engine, torchrun worker) outlives the run. A failed role's exit code and the tail of its log
are printed and the launcher exits non-zero.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from asyncrl.config import RunConfig, save_config
from asyncrl.jsonl import Tail, read_jsonl

GRACE_S = 10.0


@dataclass
class Role:
    name: str
    cmd: list[str]
    env: dict[str, str]
    log_path: Path
    log_file: IO
    proc: subprocess.Popen | None = None
    restarts: int = 0
    restart_at: float | None = None  # time.monotonic() of a scheduled restart

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=self.env,
                                     start_new_session=True)
        self.restart_at = None


def role_commands(cfg: RunConfig, config_path: Path) -> dict[str, list[str]]:
    py = sys.executable
    cmds = {"buffer": [py, "-m", "asyncrl", "buffer", "--config", str(config_path)]}
    if cfg.reward.service:
        cmds["reward"] = [py, "-m", "asyncrl", "reward", "--config", str(config_path)]
    for i in range(cfg.generator.num_generators):
        cmds[f"gen{i}"] = [py, "-m", "asyncrl", "generator", "--config", str(config_path),
                           "--index", str(i)]
    if cfg.generator.eval_engine:
        cmds["evaluator"] = [py, "-m", "asyncrl", "evaluator", "--config", str(config_path)]
    # torchrun directly, not through `asyncrl learner`: torchrun must be the one that gets
    # SIGTERM and stops its workers (a wrapper dying first broke torchrun's stderr pipe and
    # left a worker orphaned).
    cmds["learner"] = learner_command(cfg, config_path)
    return cmds


def role_env(cfg: RunConfig, role: str, env: dict[str, str]) -> dict[str, str]:
    """The learner's GPUs (learner.device_ids) as CUDA_VISIBLE_DEVICES for torchrun; the
    generators set theirs themselves (`asyncrl generator` reads generator.device_ids)."""
    if role == "learner" and cfg.learner.device_ids:
        return {**env, "CUDA_VISIBLE_DEVICES": ",".join(map(str, cfg.learner.device_ids))}
    return env


def learner_command(cfg: RunConfig, config_path: Path) -> list[str]:
    lc = cfg.learner
    rdzv = (["--standalone"] if lc.nnodes == 1 else
            ["--nnodes", str(lc.nnodes), "--rdzv-backend", "c10d",
             "--rdzv-endpoint", lc.rdzv_endpoint])
    return [sys.executable, "-m", "torch.distributed.run", *rdzv,
            "--nproc-per-node", str(lc.nproc), "--max-restarts", str(lc.max_restarts),
            "-m", "asyncrl.learner",
            "--config", str(config_path)]


def run_learner(cfg: RunConfig, run_dir: Path) -> int:
    """`asyncrl learner`: torchrun for this host's ranks, in the foreground. Its output passes
    through, and a failure ends with the ranks' own one-line errors rather than torchrun's
    ChildFailedError traceback. Ctrl-C / SIGTERM go to torchrun, which stops its workers."""
    path = run_dir / "config.yaml"
    save_config(cfg, path)
    proc = subprocess.Popen(learner_command(cfg, path), env=role_env(cfg, "learner", dict(
        os.environ)), stderr=subprocess.PIPE, text=True, bufsize=1)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _f: proc.send_signal(s))
    errors = []
    for line in proc.stderr:  # read until torchrun exits
        sys.stderr.write(line)
        if line.startswith("learner[") and "]: " in line:
            errors.append(line.strip())
    code = proc.wait()
    if code != 0:
        print(f"asyncrl learner: {errors[0] if errors else f'torchrun exited with code {code}'}",
              file=sys.stderr)
    return code


def launch(cfg: RunConfig, run_dir: Path, config_path: Path, out=print) -> int:
    from prometheus_client import CollectorRegistry

    from asyncrl import metrics

    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    roles: list[Role] = []
    stopping = {"signal": None}

    def on_signal(signum, _frame):
        stopping["signal"] = signum

    registry = CollectorRegistry()
    m = metrics.LauncherMetrics(registry)
    # Shut down when the run ends: `asyncrl study` and the benchmarks run one launch after
    # another in one process, and each needs the port again.
    server = metrics.serve(registry, cfg.net.bind_host, cfg.net.launcher_metrics_port)
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    # A resumed run's rows were shown when they were written: not again.
    shown = max((r.get("step", -1) for r in read_jsonl(run_dir / "metrics.jsonl")), default=-1)
    feed = _trackers(cfg, run_dir, out)
    try:
        for name, cmd in role_commands(cfg, config_path).items():
            role = Role(name, cmd, role_env(cfg, name, env), logs / f"{name}.log",
                        (logs / f"{name}.log").open("ab"))
            role.start()
            roles.append(role)
            m.restarts.labels(name)  # every role's series exists from the start, at 0
        out(f"[run] started {', '.join(f'{r.name} (pid {r.proc.pid})' for r in roles)}; "
            f"logs in {logs}")
        return _watch(cfg, run_dir, roles, stopping, m, out, shown)
    finally:
        _stop_all(roles)
        if feed is not None:
            feed.stop()
        for s, h in old.items():
            signal.signal(s, h)
        server.shutdown()
        server.server_close()


def _trackers(cfg: RunConfig, run_dir: Path, out):
    """run.trackers: the thread that feeds them (asyncrl/monitor.py), or None."""
    if not cfg.run.trackers:
        return None
    from omegaconf import OmegaConf

    from asyncrl.monitor import TrackerFeed, scrape_targets
    from asyncrl.trackers import TrackerSettings

    feed = TrackerFeed(run_dir, TrackerSettings.of(cfg), OmegaConf.to_container(
        OmegaConf.structured(cfg)), scrape_targets(cfg), out)
    feed.start()
    return feed


def _watch(cfg: RunConfig, run_dir: Path, roles: list[Role], stopping: dict, m, out,
           shown: int = -1) -> int:
    progress = _Progress(run_dir / "metrics.jsonl", cfg.learner.total_steps, out)
    progress.shown = shown
    t0 = time.monotonic()
    announced = False
    while True:
        progress.poll()
        if stopping["signal"] is not None:
            out(f"[run] got signal {stopping['signal']}, stopping every role")
            return 130
        for r in roles:
            if r.restart_at is not None:
                if time.monotonic() >= r.restart_at:
                    r.start()
                    m.restarts.labels(r.name).inc()
                    out(f"[run] {r.name} restarted (pid {r.proc.pid})")
                continue
            code = r.proc.poll()
            if code is None:
                continue
            if r.name == "learner" and code == 0:
                progress.poll()
                out(f"[run] learner finished; results in {run_dir}")
                return 0
            if code == 0 and r.name.startswith("gen"):
                continue  # told by the learner that training is over; the learner exits next
            if r.name == "learner" or r.restarts >= cfg.run.max_role_restarts:
                budget = ("" if r.name == "learner" else
                          f" after {r.restarts} restarts (run.max_role_restarts="
                          f"{cfg.run.max_role_restarts})")
                out(f"[run] {r.name} exited with code {code}{budget}; stopping the other roles.")
                out(f"[run] last lines of {r.log_path}:")
                out(_tail(r.log_path, 25))
                return code or 1
            signal_group(r.proc, signal.SIGKILL)  # anything the dead role left behind
            delay = cfg.run.restart_delay_s * 2 ** r.restarts
            r.restarts += 1
            r.restart_at = time.monotonic() + delay
            out(f"[run] {r.name} exited with code {code}; restarting it in {delay:.1f}s "
                f"(restart {r.restarts} of run.max_role_restarts={cfg.run.max_role_restarts}; "
                f"its log: {r.log_path})")
        if not announced and not progress.started and time.monotonic() - t0 > 15:
            out("[run] waiting for the generators' vLLM engines and the first evaluation...")
            announced = True
        time.sleep(0.5)


def _stop_all(roles: list[Role]) -> None:
    running = [r for r in roles if r.proc is not None]
    # torchrun starts each worker in a session of its own: a SIGKILLed torchrun would leave
    # them running, so every descendant is noted now, while it can still be found.
    family = {d for r in running if r.proc.poll() is None for d in _descendants(r.proc.pid)}
    for r in running:
        if r.proc.poll() is None:
            signal_group(r.proc, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    for r in running:
        try:
            r.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for r in running:
        # SIGKILL the whole group even if the leader exited: its children may not have.
        signal_group(r.proc, signal.SIGKILL)
        if r.proc.poll() is None:
            r.proc.wait(timeout=5)
    for pid in family:  # anything that left its role's group (torchrun's workers)
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for r in roles:
        r.log_file.close()


def _descendants(pid: int) -> set[int]:
    """Every process below `pid`, from /proc (Linux); empty where it cannot be read."""
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                kids = Path(f"/proc/{p}/task/{t}/children").read_text().split()
            except OSError:
                continue
            for k in map(int, kids):
                if k not in found:
                    found.add(k)
                    todo.append(k)
    return found


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Send `sig` to the process group `proc` leads (started in a session of its own, so the
    group id is its pid); a group already gone is left alone."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path, n: int) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "  (no log)"
    return "\n".join("  | " + ln for ln in lines[-n:])


class _Progress:
    """Prints one line per new metrics.jsonl row (every row when evaluated, else every 5th).
    A restarted learner rewrites the file (rows after its checkpoint go); the row that says
    so is announced, and the replayed steps are shown again."""

    def __init__(self, path: Path, total_steps: int, out):
        self.tail, self.total, self.out = Tail(path), total_steps, out
        self.shown = -1  # highest step shown
        self.started = False

    def poll(self) -> None:
        for row in self.tail.new_rows():
            self.started = True
            try:
                self._show(row)
            except (KeyError, TypeError):
                continue  # a malformed row is not worth stopping the run for

    def _show(self, r: dict) -> None:
        step = r["step"]
        if "resumed_from_step" in r:
            self.out(f"[run] the learner restarted and resumed from its checkpoint at step "
                     f"{r['resumed_from_step']}")
            self.shown = r["resumed_from_step"]
        if step <= self.shown:
            return
        self.shown = step
        if step == 0:
            self.out(f"[step 0/{self.total}] SFT policy: eval accuracy {r['eval_accuracy']:.1%}")
            return
        if "eval_accuracy" not in r and step % 5:
            return
        parts = [f"reward {r['reward_mean']:.3f}",
                 f"staleness {r['staleness_mean']:.2f}", f"{r['tokens_per_s']:.0f} tok/s",
                 f"{r['elapsed_s']:.0f}s"]
        if "eval_accuracy" in r:
            parts.insert(1, f"eval acc {r['eval_accuracy']:.1%}")
        self.out(f"[step {step}/{self.total}] " + " | ".join(parts))
