"""`asyncrl study staleness`: one command for an on-policy vs off-policy staleness sweep.

    asyncrl study staleness configs/default.yaml --max-staleness 0,1,2,4 \
        --correction none,tis,decoupled --seeds 2 --out studies/staleness [key=value ...]

Runs the grid (every max_staleness x correction x seed, plus one strictly synchronous run per
seed as the on-policy baseline) one run at a time with `asyncrl run`'s launcher, each in
OUT/<setting>-seed<k>/. A run is done when its summary.json exists; running the same command
again skips finished runs and restarts unfinished ones, so a half-finished sweep resumes.
Staleness is measured in one unit everywhere: policy versions, per token. For a bound m the
buffer admits m learner steps ahead (buffer.admit_steps=max(1, m)), so data really is about m
versions old; m=0 is asynchronous but on-policy (stale data is dropped, and counted).

The report (OUT/report/) holds runs.csv (every run's per-step metrics), accuracy and reward
against learner step, wall-clock time and generated samples, the token staleness histogram
and importance-weight ESS per setting, and summary.md.
"""

from __future__ import annotations

import csv
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

from asyncrl.config import load_config
from asyncrl.jsonl import read_jsonl

CSV_KEYS = ["step", "elapsed_s", "samples_trained", "stale_dropped_total", "reward_mean",
            "eval_accuracy", "staleness_mean", "is_ess", "tokens_per_s", "clipfrac",
            "behav_vs_prox", "prox_vs_current"]


@dataclass(frozen=True)
class Setting:
    name: str
    overrides: tuple[str, ...]


def grid(max_staleness: list[int], corrections: list[str]) -> list[Setting]:
    out = [Setting("sync", ("generator.on_policy=true", "buffer.max_staleness=0",
                            "weight_sync.interval=1", "buffer.admit_steps=1",
                            "learner.offpolicy=none"))]
    for m in max_staleness:
        for corr in corrections:
            out.append(Setting(f"ms{m}-{corr}", (
                "generator.on_policy=false", f"buffer.max_staleness={m}",
                f"buffer.admit_steps={max(1, m)}",
                "weight_sync.interval=1", f"learner.offpolicy={corr}")))
    return out


def run_sweep(config: str, overrides: list[str], settings: list[Setting], seeds: int,
              out_dir: Path, target: float, progress=print) -> Path:
    run_grid(config, overrides, settings, seeds, out_dir, progress)
    return write_report(out_dir, settings, seeds, target)


def run_grid(config: str, overrides: list[str], settings: list[Setting], seeds: int,
             out_dir: Path, progress=print) -> None:
    """Every setting x seed, one `asyncrl run` at a time in OUT/<setting>-seed<k>/; finished
    runs (summary.json) are skipped, unfinished ones started again: the sweep resumes."""
    from asyncrl.runner import execute_run

    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [(s, k) for k in range(seeds) for s in settings]
    for i, (s, seed) in enumerate(runs, 1):
        run_dir = out_dir / f"{s.name}-seed{seed}"
        if (run_dir / "summary.json").exists():
            progress(f"[study] {i}/{len(runs)} {run_dir.name}: done, skipped")
            continue
        if run_dir.exists():  # an unfinished run: start it again from scratch
            shutil.rmtree(run_dir)
        progress(f"[study] {i}/{len(runs)} {run_dir.name}")
        cfg = load_config(config, [*overrides, *s.overrides, f"learner.seed={seed}",
                                   f"generator.seed={seed}", f"run_dir={run_dir}"])
        code = execute_run(cfg, out=lambda line, n=run_dir.name: progress(f"  {n} {line}"))
        if code != 0:
            raise RuntimeError(f"run {run_dir} failed with exit code {code}; see its logs/. "
                               "Run the same command again to resume the sweep.")


def _rows(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "metrics.jsonl")


def write_report(out_dir: Path, settings: list[Setting], seeds: int, target: float) -> Path:
    report = out_dir / "report"
    report.mkdir(exist_ok=True)
    data = {s.name: [_rows(out_dir / f"{s.name}-seed{k}") for k in range(seeds)
                     if (out_dir / f"{s.name}-seed{k}" / "summary.json").exists()]
            for s in settings}
    data = {k: v for k, v in data.items() if v}
    with (report / "runs.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["setting", "seed", *CSV_KEYS])
        for name, runs in data.items():
            for seed, rows in enumerate(runs):
                for r in rows:
                    w.writerow([name, seed, *[r.get(k, "") for k in CSV_KEYS]])
    _plots(report, data)
    (report / "summary.md").write_text(_summary(data, target))
    return report


def _evals(rows: list[dict], x: str) -> list[tuple[float, float]]:
    return [(_x(r, x), r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]


def _x(r: dict, x: str) -> float:
    if x == "samples_generated":  # trained plus dropped as stale: what the generators made
        return (r.get("samples_trained") or 0) + (r.get("stale_dropped_total") or 0)
    return r.get(x) or 0.0


def _mean_curve(runs: list[list[dict]], x: str, key: str = "eval_accuracy"):
    curves = [[(_x(r, x), r[key]) for r in rows if r.get(key) is not None] for rows in runs]
    n = min(map(len, curves))
    return ([statistics.mean(c[i][0] for c in curves) for i in range(n)],
            [statistics.mean(c[i][1] for c in curves) for i in range(n)])


def _plots(report: Path, data: dict[str, list[list[dict]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5), dpi=100)
    for col, (x, label) in enumerate([("step", "learner step"), ("elapsed_s", "wall clock (s)"),
                                      ("samples_generated", "samples generated")]):
        for name, runs in data.items():
            axes[0, col].plot(*_mean_curve(runs, x), "o-", ms=3, label=name,
                              lw=2.5 if name == "sync" else 1.5)
            axes[1, col].plot(*_mean_curve(runs, x, "reward_mean"), lw=1, label=name)
        axes[0, col].set(xlabel=label, ylabel="held-out accuracy")
        axes[1, col].set(xlabel=label, ylabel="batch reward")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("staleness sweep: accuracy and reward (mean over seeds)")
    fig.tight_layout()
    fig.savefig(report / "accuracy_reward.png")
    plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 4.5), dpi=100)
    names = list(data)
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        hist: dict[int, int] = {}
        for rows in data[name]:
            for r in rows:
                for lag, n in (r.get("staleness_tokens") or {}).items():
                    hist[int(lag)] = hist.get(int(lag), 0) + n
        total = max(1, sum(hist.values()))
        lags = sorted(hist)
        shift = (i - (len(names) - 1) / 2) * width  # the settings side by side around x=lag
        ax1.bar([lag + shift for lag in lags], [hist[lag] / total for lag in lags], width,
                label=name)
        ess = [statistics.mean(r["is_ess"] for r in rows if "is_ess" in r) for rows in data[name]]
        ax2.bar(i, statistics.mean(ess), label=name)
    ax1.set(xlabel="staleness (policy versions)", ylabel="fraction of trained tokens",
            title="token staleness")
    ax1.set_xticks(sorted({int(k) for runs in data.values() for rows in runs for r in rows
                           for k in (r.get("staleness_tokens") or {})}))
    ax2.set(xticks=range(len(names)), ylabel="mean importance-weight ESS / n",
            title="behaviour->proximal importance-weight ESS")
    ax2.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(report / "staleness_ess.png")
    plt.close(fig)


def _summary(data: dict[str, list[list[dict]]], target: float) -> str:
    lines = [f"| setting | seeds | final accuracy | best accuracy | worst accuracy | time to "
             f"{target:.0%} (s) | trained tokens/s | tokens per trained completion "
             "| staleness (mean) | dropped as stale |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, runs in data.items():
        finals = [_evals(rows, "step")[-1][1] for rows in runs]
        bests = [max(a for _, a in _evals(rows, "step")) for rows in runs]
        # the lowest evaluation after the start: where a setting collapses and recovers, its
        # final accuracy hides it
        worsts = [min((a for _, a in _evals(rows[1:], "step")), default=float("nan"))
                  for rows in runs]
        times = [next((t for t, a in _evals(rows, "elapsed_s") if a >= target), None)
                 for rows in runs]
        reached = [t for t in times if t is not None]
        last = [rows[-1] for rows in runs]
        stale = statistics.mean(statistics.mean(x["staleness_mean"] for x in rows[1:])
                                for rows in runs)
        dropped = [r.get("stale_dropped_total", 0) / max(1, r.get("samples_trained", 0)
                                                         + r.get("stale_dropped_total", 0))
                   for r in last]
        # completion tokens per completion trained: below sync's when long completions go stale
        # and are dropped (a length bias that accuracy alone does not show)
        lengths = [sum(x.get("tokens") or 0 for x in rows[1:]) / max(1, r.get("samples_trained")
                                                                     or 0)
                   for rows, r in zip(runs, last)]
        lines.append(" | ".join([
            f"| {name}", str(len(runs)), _pm(finals), _pm(bests), _pm(worsts),
            (_pm(reached, ".0f") + ("" if len(reached) == len(runs) else
                                    f" ({len(reached)}/{len(runs)} reached)")) if reached
            else "not reached",
            f"{statistics.mean(r['tokens_per_s'] for r in last):.0f}",
            f"{statistics.mean(lengths):.1f}" if any(lengths) else "-",
            f"{stale:.2f}",
            f"{statistics.mean(dropped):.1%} |"]))
    return "\n".join(lines) + "\n"


def _pm(values: list[float], fmt: str = ".3f") -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{statistics.mean(values):{fmt}} +- {statistics.stdev(values):{fmt}}"
