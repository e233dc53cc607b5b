"""Iterated preferences (rm.rounds): the raters compare the samples of the policies RL trains,
and the reward model learns from them, round after round.

A reward model trained on the SFT policy's samples alone is right where that policy goes and
wrong where RL takes it: on this project's addition task the SFT policy's mistakes are
forgotten carries, and the policies RL trains against the first reward model write answers
off by one in the units digit, which no rater ever saw and which that model scores above the
right answer (60.5% agreement with the gold preference on their samples, 96.5% on the SFT
policy's; docs/rlhf.md). InstructGPT and Anthropic's HH collected comparisons of their current
policies for the same reason. Each round here:

1. runs RL (`asyncrl run`, this config, learner.total_steps) against the current reward model,
   in WORK/round-R/run (a killed build resumes it: asyncrl run resumes an unfinished run);
2. has the raters label rm.round_pairs pairs of that run's kept checkpoints' samples (the
   gold preference with the raters' noise, as the first data; asyncrl/rm/gold.py);
3. fine-tunes the current reward model (rm.round_steps steps at rm.round_lr) on every round's
   pairs so far and as many fresh pairs of the SFT policy's samples (sampled once), so it
   keeps what it knew.

Held out: the SFT policy's and every round policy's samples on the held-out problems, labelled
by the gold preference; rounds.json has the agreement on each after every round.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from asyncrl.jsonl import read_jsonl
from asyncrl.rm.data import Pair, RmData


def iterate(cfg, rm0: Path, out: Path, work: Path,
            progress: Callable[[str], None] = print) -> Path:
    """rm.rounds rounds from the reward model rm0 (cfg: model.path resolved, rm.data the
    builtin preferences); the last round's reward model is written to `out` (built once), the
    rounds' runs, pairs and models stay in `work` (kept: a stopped build goes on from there)."""
    if (out / "config.json").is_file():
        return out
    work.mkdir(parents=True, exist_ok=True)
    with _alone(work, progress):  # two builders would run two RL runs in one run directory
        if (out / "config.json").is_file():  # the other one built it
            return out
        return _iterate(cfg, rm0, out, work, progress)


@contextlib.contextmanager
def _alone(work: Path, progress):
    """Hold WORK/.lock: a second process building the same rounds waits for the first."""
    import fcntl

    with (work / ".lock").open("w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"[rm rounds] another process is building {work}; waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _iterate(cfg, rm0: Path, out: Path, work: Path, progress) -> Path:
    from asyncrl.task.build import build_once

    sft = _pairs(cfg, cfg.model.path, work / "sft", tag=1, who="the SFT policy", progress=progress)
    rm, report, rounds = rm0, [], []
    for r in range(1, cfg.rm.rounds + 1):
        here = work / f"round-{r}"
        run_dir = _rl_run(cfg, rm, here, r, progress)
        policies = sorted((run_dir / "checkpoints").glob("step_*"),
                          key=lambda p: int(p.name.split("_")[1]))
        if not policies:
            raise RuntimeError(f"rm.rounds: round {r}'s run {run_dir} kept no checkpoint")
        each = -(-cfg.rm.round_pairs // len(policies))
        rounds.append([_pairs(cfg, str(p), here / f"pairs-{p.name}", tag=1 + 10 * r + i,
                              who=f"round {r}'s {p.name}", progress=progress, n=each)
                       for i, p in enumerate(policies)])
        seen = _agreement(rm, [p for _, held in rounds[-1] for p in held])
        rm = _fine_tune(cfg, rm, sft, rounds, here / "rm", r, progress)
        report.append(_report(rm, sft, rounds, r, run_dir, seen))
        progress(f"[rm rounds] round {r}/{cfg.rm.rounds}: the reward model it trained against "
                 f"agreed with the gold preference on {percent(seen)} of its policies' "
                 "held-out pairs; the new one on: "
                 + ", ".join(f"{k} {percent(v)}" for k, v in report[-1]["agreement"].items()))
        (work / "rounds.json").write_text(json.dumps(report, indent=1) + "\n")

    def copy_last(tmp: Path) -> None:
        shutil.copytree(rm, tmp, dirs_exist_ok=True)
        (tmp / "rounds.json").write_text(json.dumps(report, indent=1) + "\n")

    return build_once(out, copy_last)


def _rl_run(cfg, rm: Path, here: Path, r: int, progress) -> Path:
    """Round r's RL run against the reward model `rm`: this config through `asyncrl run`, in a
    process of its own (every role, port and check as in any run)."""
    from asyncrl.config import save_config

    run_dir = here / "run"
    if (run_dir / "summary.json").is_file():
        return run_dir
    here.mkdir(parents=True, exist_ok=True)
    sub = copy.deepcopy(cfg)
    sub.name = f"{cfg.name}-rm-round{r}"
    sub.run_dir = str(run_dir)
    sub.task.reward_model = str(rm)
    sub.rm.rounds, sub.rm.base = 0, ""  # nothing to build in there
    save_config(sub, here / "config.yaml")
    progress(f"[rm rounds] round {r}/{cfg.rm.rounds}: RL against {rm} "
             f"({cfg.learner.total_steps} steps) in {run_dir}")
    proc = subprocess.Popen([sys.executable, "-m", "asyncrl", "run", str(here / "config.yaml")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        progress(f"[rm round {r}] {line.rstrip()}")
    if proc.wait() != 0 or not (run_dir / "summary.json").is_file():
        raise RuntimeError(f"rm.rounds: round {r}'s RL run failed (exit {proc.returncode}); "
                           f"its logs are in {run_dir / 'logs'}; the same command goes on "
                           "from where it stopped")
    return run_dir


def _pairs(cfg, policy: str, path: Path, tag: int, who: str, progress,
           n: int = 0) -> tuple[list[Pair], list[Pair]]:
    """(training, held-out) pairs of `policy`'s samples labelled by the raters, made once and
    kept in path.{train,held}.jsonl."""
    from asyncrl.rm.gold import make_preferences

    files = [path.with_name(path.name + ".train.jsonl"), path.with_name(path.name + ".held.jsonl")]
    if not all(f.is_file() for f in files):
        made = make_preferences(cfg, policy, progress, pairs=n or cfg.rm.round_pairs, tag=tag,
                                who=who)
        for f, rows in zip(files, made, strict=True):
            tmp = f.with_name(f.name + ".tmp")
            tmp.write_text("".join(json.dumps(p.__dict__) + "\n" for p in rows))
            tmp.replace(f)
    return tuple([Pair(**row) for row in read_jsonl(f)] for f in files)


def _fine_tune(cfg, rm: Path, sft, rounds, out: Path, r: int, progress) -> Path:
    from asyncrl.rm.train import train_reward_model
    from asyncrl.task.build import build_once

    if (out / "config.json").is_file():
        return out
    train = list(sft[0]) + [p for made in rounds for train, _ in made for p in train]
    held = list(sft[1]) + [p for made in rounds for _, held in made for p in held]
    sub = copy.deepcopy(cfg)
    sub.rm.base, sub.rm.steps, sub.rm.lr = str(rm), cfg.rm.round_steps, cfg.rm.round_lr
    progress(f"[rm rounds] round {r}/{cfg.rm.rounds}: fine-tuning {rm} on {len(train)} "
             f"pairs ({len(sft[0])} of the SFT policy's samples)")
    data = (RmData("pairwise", train), held, f"builtin:addition-preferences, round {r}")
    return build_once(out, lambda tmp: train_reward_model(sub, tmp, progress, data))


def _agreement(rm: Path, held: list[Pair]) -> float | None:
    """The share of `held` the reward model orders as the gold preference does (None: no
    pair, when every sample of a policy tied)."""
    from asyncrl.rm.train import held_out_accuracy, load_base

    if not held:
        return None
    model, tok = load_base(str(rm))
    return held_out_accuracy(model.eval(), tok, held)


def percent(x: float | None) -> str:
    return "no pair" if x is None else f"{x:.1%}"


def _report(rm: Path, sft, rounds, r: int, run_dir: Path, seen: float | None) -> dict:
    """Round r's new reward model's agreement with the gold preference on the SFT policy's
    and each round's held-out pairs, the agreement of the one before it on round r's
    (`before`), and round r's RL run's win rate against the SFT policy."""
    agreement = {"SFT policy": _agreement(rm, sft[1])}
    for i, made in enumerate(rounds, 1):
        agreement[f"round {i}"] = _agreement(rm, [p for _, held in made for p in held])
    win = run_dir / "win_rate.json"
    return {"round": r, "run": str(run_dir), "before": seen, "agreement": agreement,
            "run_win_rate": json.loads(win.read_text()).get("win_rate") if win.is_file() else None}
