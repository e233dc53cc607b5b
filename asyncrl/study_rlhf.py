"""`asyncrl study rlhf`: reward-model over-optimisation, measured as Gao et al. 2022 ("Scaling
Laws for Reward Model Overoptimization") plot it, in one resumable command.

    asyncrl study rlhf configs/rlhf.yaml --kl-coef 0.01,0.05,0.2 --rm-pairs 500,2000,8000 \
        [--max-staleness 0,2] [--seeds 1] [--out studies/rlhf] [key=value ...]

Each setting is one RLHF run (rm.pairs: the reward model's training pairs, each size trained
once and cached, without rounds of iterated preferences (rm.rounds=0), so that its size is the
one thing that differs; learner.kl_coef: the KL penalty to the reference; with --max-staleness the
staleness bound as one more axis), run one at a time with `asyncrl run`'s launcher in
OUT/<setting>-seed<k>/, skipped when finished, so a half-done study resumes. The config must
log the gold reward beside the proxy (task.rewards has `gold` with weight 0, as
configs/rlhf.yaml does).

Per logged step: the proxy reward (the reward model's raw score, reward_reward_model), the
gold reward (reward_gold) and the policy's KL distance from the reference, sequence-level:
the learner's token-mean KL (kl_ref) times the mean completion length. The report
(OUT/report/): overoptimization.png (gold and proxy, each as its change since the first
steps, smoothed over 5 steps and averaged in bins of sqrt(KL), against sqrt(KL), one panel per
reward-model size, one line per KL coefficient),
runs.csv, and summary.md: per run the final KL, proxy and gold changes (the last 5 steps'
mean against the first 3 steps': one batch's reward is noisy), where gold peaked,
whether proxy and gold parted (gold fell from its peak by more than its noise while proxy
kept rising), the reward model's held-out agreement with the gold preference, and the final
policy's win rate against the SFT policy as the gold preference judges them.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from asyncrl.jsonl import read_jsonl
from asyncrl.study import Setting, run_grid

CSV_KEYS = ["step", "elapsed_s", "kl_ref", "kl_seq", "reward_reward_model", "reward_gold",
            "reward_mean", "eval_accuracy"]


def grid(kl_coefs: list[float], pairs: list[int], staleness: list[int] | None) -> list[Setting]:
    out = []
    for n in pairs:
        for k in kl_coefs:
            for s in staleness or [None]:
                extra = () if s is None else (f"buffer.max_staleness={s}",
                                              f"buffer.admit_steps={max(1, s)}")
                name = f"rm{n}-kl{k:g}" + ("" if s is None else f"-ms{s}")
                out.append(Setting(name, (f"rm.pairs={n}", "rm.rounds=0",
                                          f"learner.kl_coef={k:g}", *extra)))
    return out


def run_study(config: str, overrides: list[str], settings: list[Setting], seeds: int,
              out_dir: Path, progress=print) -> Path:
    run_grid(config, overrides, settings, seeds, out_dir, progress)
    return write_report(out_dir, settings, seeds)


def curve(rows: list[dict]) -> list[dict]:
    """The rows that trained (step >= 1), with the sequence-level KL estimate."""
    out = []
    for r in rows:
        if r.get("step", 0) < 1 or r.get("kl_ref") is None:
            continue
        length = (r.get("tokens") or 0) / max(1, r.get("completions") or 1)
        out.append({**r, "kl_seq": max(0.0, r["kl_ref"]) * max(1.0, length)})
    return out


def _smooth(values: list[float], k: int = 5) -> list[float]:
    return [sum(values[max(0, i - k + 1):i + 1]) / len(values[max(0, i - k + 1):i + 1])
            for i in range(len(values))]


def parted(rows: list[dict]) -> dict:
    """Where gold peaked and whether proxy and gold parted after it (both smoothed over 5
    steps): gold ended below its peak by more than twice its step-to-step noise while the
    proxy at the end is above the proxy at gold's peak."""
    gold = _smooth([r["reward_gold"] for r in rows])
    proxy = _smooth([r["reward_reward_model"] for r in rows])
    peak = max(range(len(gold)), key=gold.__getitem__)
    noise = (sum((a - b) ** 2 for a, b in zip(gold[1:], gold)) / max(1, len(gold) - 1)) ** 0.5
    return {"gold_peak_step": rows[peak]["step"], "gold_peak_kl": rows[peak]["kl_seq"],
            "parted": bool(gold[-1] < gold[peak] - 2 * noise and proxy[-1] > proxy[peak])}


def write_report(out_dir: Path, settings: list[Setting], seeds: int) -> Path:
    report = out_dir / "report"
    report.mkdir(exist_ok=True)
    runs = {}
    for s in settings:
        for k in range(seeds):
            d = out_dir / f"{s.name}-seed{k}"
            if (d / "summary.json").exists():
                rows = curve(read_jsonl(d / "metrics.jsonl"))
                if rows and all("reward_gold" in r and "reward_reward_model" in r
                                for r in rows):
                    runs[(s, k)] = (d, rows)
    with (report / "runs.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["setting", "seed", *CSV_KEYS])
        for (s, k), (_, rows) in runs.items():
            for r in rows:
                w.writerow([s.name, k, *[r.get(c, "") for c in CSV_KEYS]])
    _plot(report / "overoptimization.png", runs)
    (report / "summary.md").write_text(_summary(runs))
    return report


def _plot(path: Path, runs: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({_override(s, "rm.pairs") for s, _ in runs}, key=float)
    fig, axes = plt.subplots(1, max(1, len(sizes)), figsize=(6 * max(1, len(sizes)), 4.5),
                             dpi=100, squeeze=False)
    for col, size in enumerate(sizes):
        ax = axes[0, col]
        twin = ax.twinx()
        for i, ((s, k), (_, rows)) in enumerate(r for r in runs.items()
                                                if _override(r[0][0], "rm.pairs") == size):
            # KL does not grow every step: smooth each series over 5 steps, then bin by KL
            x = [math.sqrt(v) for v in _smooth([r["kl_seq"] for r in rows])]
            gold = _smooth([r["reward_gold"] - _start(rows, "reward_gold") for r in rows])
            proxy = _smooth([r["reward_reward_model"] - _start(rows, "reward_reward_model")
                             for r in rows])
            label = f"kl_coef {_override(s, 'learner.kl_coef')}" + (f" seed {k}" if k else "")
            color = f"C{i}"
            ax.plot(*_binned(x, gold), "o-", color=color, lw=2, ms=3, label=f"gold, {label}")
            twin.plot(*_binned(x, proxy), "s--", color=color, lw=1.2, ms=3,
                      label=f"proxy, {label}")
        ax.set(xlabel="sqrt(KL(policy || reference)), per sequence",
               ylabel="gold reward change (solid)", title=f"reward model on {size} pairs")
        twin.set_ylabel("proxy (reward model) change (dashed)")
        ax.grid(alpha=0.3)
        lines = ax.get_legend_handles_labels()
        twins = twin.get_legend_handles_labels()
        ax.legend(lines[0] + twins[0], lines[1] + twins[1], fontsize=7, loc="upper left")
    fig.suptitle("reward-model over-optimisation: gold vs proxy against KL (Gao et al. 2022)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _binned(x: list[float], y: list[float], bins: int = 12) -> tuple[list, list]:
    """The mean of y in `bins` equal-count bins of x, in order of x."""
    pts = sorted(zip(x, y))
    size = max(1, len(pts) // bins)
    groups = [pts[i:i + size] for i in range(0, len(pts), size)]
    return ([sum(p[0] for p in g) / len(g) for g in groups],
            [sum(p[1] for p in g) / len(g) for g in groups])


def _override(s: Setting, key: str) -> str:
    return next(o.split("=", 1)[1] for o in s.overrides if o.startswith(key + "="))


def _summary(runs: dict) -> str:
    lines = ["| setting | seed | RM held-out agreement | final KL (seq) | proxy change | "
             "gold change | gold peak (step, KL) | parted | win rate vs SFT (gold) |",
             # changes: the last 5 steps' mean against the first 3 steps' mean
             "|---|---|---|---|---|---|---|---|---|"]
    for (s, k), (d, rows) in runs.items():
        p = parted(rows)
        agreement = _agreement(d)
        win = _json(d / "win_rate.json").get("win_rate")
        lines.append(
            f"| {s.name} | {k} | {agreement} | {_end(rows, 'kl_seq'):.3f} | "
            f"{_end(rows, 'reward_reward_model') - _start(rows, 'reward_reward_model'):+.3f} | "
            f"{_end(rows, 'reward_gold') - _start(rows, 'reward_gold'):+.3f} | "
            f"{p['gold_peak_step']}, {p['gold_peak_kl']:.3f} | {'yes' if p['parted'] else 'no'} | "
            + (f"{win:.1%} |" if win is not None else "- |"))
    return "\n".join(lines) + "\n"


def _start(rows: list[dict], key: str) -> float:
    """The first 3 steps' mean: one batch's reward is noisy (16 groups)."""
    return sum(r[key] for r in rows[:3]) / len(rows[:3])


def _end(rows: list[dict], key: str) -> float:
    """The last 5 steps' mean."""
    return sum(r[key] for r in rows[-5:]) / len(rows[-5:])


def _agreement(run_dir: Path) -> str:
    """The held-out accuracy train-rm recorded for the run's reward model."""
    from omegaconf import OmegaConf

    try:  # the saved config as written: its reward model may have moved since
        rm = OmegaConf.load(run_dir / "config.yaml").task.reward_model
    except (OSError, ValueError, AttributeError):
        return "-"
    acc = _json(Path(rm) / "train_rm.json").get("held_out_accuracy")
    return f"{acc:.1%}" if acc is not None else "-"


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
