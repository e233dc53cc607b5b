"""Plots of a run's metrics.jsonl (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def plot_run(metrics_path: Path, out_path: Path) -> Path:
    """Reward (per step) and held-out accuracy (when evaluated) against learner step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    rew = [(r["step"], r["reward_mean"]) for r in rows if r.get("reward_mean") is not None]
    acc = [(r["step"], r["eval_accuracy"]) for r in rows if r.get("eval_accuracy") is not None]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if rew:
        ax.plot(*zip(*rew), color="tab:blue", alpha=0.35, lw=1, label="batch reward (mean)")
        k = max(1, len(rew) // 20)
        values = [v for _, v in rew]
        smooth = [sum(values[max(0, i - k + 1) : i + 1]) / len(values[max(0, i - k + 1) : i + 1])
                  for i in range(len(values))]
        ax.plot([s for s, _ in rew], smooth, color="tab:blue", lw=2,
                label=f"batch reward ({k}-step mean)")
    if acc:
        ax.plot(*zip(*acc), "o-", color="tab:red", lw=2, label="held-out accuracy (greedy)")
        ax.annotate(f"SFT {acc[0][1]:.1%}", acc[0], textcoords="offset points", xytext=(5, -14))
        ax.annotate(f"{acc[-1][1]:.1%}", acc[-1], textcoords="offset points", xytext=(-20, 8))
    ax.set_xlabel("learner step (policy version)")
    ax.set_ylabel("reward / accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(f"asyncrl run: {Path(metrics_path).parent.name}")
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
