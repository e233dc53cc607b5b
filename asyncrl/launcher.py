"""`asyncrl run`: start buffer, generators and a torchrun learner as separate processes.

Each role runs in its own session (process group), with its output in RUN_DIR/logs/<role>.log.
The launcher prints progress from RUN_DIR/metrics.jsonl. When the learner finishes, or when any
role dies, or on Ctrl-C/SIGTERM, every role's whole process group gets SIGTERM, then SIGKILL
after a grace period, so no orphan (vLLM engine, torchrun worker) outlives the run. A failed
role's exit code and the tail of its log are printed and the launcher exits non-zero.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from asyncrl.config import RunConfig

GRACE_S = 10.0


@dataclass
class Role:
    name: str
    proc: subprocess.Popen
    log_path: Path
    log_file: IO


def role_commands(cfg: RunConfig, config_path: Path) -> dict[str, list[str]]:
    py = sys.executable
    cmds = {"buffer": [py, "-m", "asyncrl", "buffer", "--config", str(config_path)]}
    for i in range(cfg.generator.num_generators):
        cmds[f"gen{i}"] = [py, "-m", "asyncrl", "generator", "--config", str(config_path),
                           "--index", str(i)]
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


def launch(cfg: RunConfig, run_dir: Path, config_path: Path, out=print) -> int:
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    roles: list[Role] = []
    stopping = {"signal": None}

    def on_signal(signum, _frame):
        stopping["signal"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for name, cmd in role_commands(cfg, config_path).items():
            f = (logs / f"{name}.log").open("ab")
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=role_env(cfg, name, env), start_new_session=True)
            roles.append(Role(name, p, logs / f"{name}.log", f))
        out(f"[run] started {', '.join(f'{r.name} (pid {r.proc.pid})' for r in roles)}; "
            f"logs in {logs}")
        return _watch(cfg, run_dir, roles, stopping, out)
    finally:
        _stop_all(roles)
        for s, h in old.items():
            signal.signal(s, h)


def _watch(cfg: RunConfig, run_dir: Path, roles: list[Role], stopping: dict, out) -> int:
    progress = _Progress(run_dir / "metrics.jsonl", cfg.learner.total_steps, out)
    t0 = time.monotonic()
    announced = False
    while True:
        progress.poll()
        if stopping["signal"] is not None:
            out(f"[run] got signal {stopping['signal']}, stopping every role")
            return 130
        for r in roles:
            code = r.proc.poll()
            if code is None:
                continue
            if r.name == "learner" and code == 0:
                progress.poll()
                out(f"[run] learner finished; results in {run_dir}")
                return 0
            if code == 0 and r.name.startswith("gen"):
                continue  # told by the learner that training is over; the learner exits next
            out(f"[run] {r.name} exited with code {code}; stopping the other roles.")
            out(f"[run] last lines of {r.log_path}:")
            out(_tail(r.log_path, 25))
            return code or 1
        if not announced and not progress.started and time.monotonic() - t0 > 15:
            out("[run] waiting for the generators' vLLM engines and the first evaluation...")
            announced = True
        time.sleep(0.5)


def _stop_all(roles: list[Role]) -> None:
    for r in roles:
        if r.proc.poll() is None:
            _signal_group(r.proc, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    for r in roles:
        try:
            r.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for r in roles:
        # SIGKILL the whole group even if the leader exited: its children may not have.
        _signal_group(r.proc, signal.SIGKILL)
        if r.proc.poll() is None:
            r.proc.wait(timeout=5)
        r.log_file.close()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
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
    A restarted learner rewrites the file (rows after its checkpoint go); that is noticed by
    the file's identity and announced, and the replayed steps are shown again."""

    def __init__(self, path: Path, total_steps: int, out):
        self.path, self.total, self.out = path, total_steps, out
        self.offset = 0
        self.inode = None
        self.shown = -1  # highest step shown
        self.started = False

    def poll(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return
        if st.st_ino != self.inode or st.st_size < self.offset:  # replaced on a resume
            self.inode, self.offset = st.st_ino, 0
        with self.path.open() as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind("\n") + 1]
        self.offset += len(complete.encode())
        for line in complete.splitlines():
            self.started = True
            try:
                self._show(json.loads(line))
            except (json.JSONDecodeError, KeyError, TypeError):
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
