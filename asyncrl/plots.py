"""Plots of a run's metrics.jsonl and completion lengths (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

from asyncrl.jsonl import read_jsonl


def plot_run(metrics_path: Path, out_path: Path) -> Path:
    """Reward (per step) and held-out accuracy (when evaluated) against learner step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(metrics_path)
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
    # Composite rewards (configs/reasoning.yaml sums to 4) must not run off the top.
    values = [v for _, v in rew]
    ax.set_ylim(min(0.0, *values), max(1.0, *(v * 1.05 for v in values)))
    ax.set_title(f"asyncrl run: {Path(metrics_path).parent.name}")
    return _save(fig, [ax], out_path)


def plot_episodes(metrics_path: Path, out_path: Path) -> Path | None:
    """Multi-turn runs (env.name): model turns per episode, the tool-call success rate and
    the held-out accuracy against learner step (episodes.png); None for a run without
    episodes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(metrics_path)
    turns = [(r["step"], r["episode_turns"]) for r in rows if "episode_turns" in r]
    if not turns:
        return None
    success = [(r["step"], r["tool_success"]) for r in rows if "tool_success" in r]
    acc = [(r["step"], r["eval_accuracy"]) for r in rows if r.get("eval_accuracy") is not None]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), dpi=110, sharex=True)
    top.plot(*zip(*turns), color="tab:purple", lw=1.5, label="model turns per episode")
    top.set_ylabel("turns")
    top.grid(alpha=0.3)
    top.legend(loc="best")
    if success:
        bottom.plot(*zip(*success), color="tab:green", lw=1.5,
                    label="tool calls answered without error")
    if acc:
        bottom.plot(*zip(*acc), "o-", color="tab:red", lw=2, label="held-out accuracy (greedy)")
    bottom.set_ylim(0, 1.02)
    bottom.set_xlabel("learner step (policy version)")
    bottom.set_ylabel("rate")
    top.set_title(f"asyncrl episodes: {Path(metrics_path).parent.name}")
    return _save(fig, [bottom], out_path)


def _save(fig, axes, out_path: Path) -> Path:
    """A grid and a legend on `axes`, then the figure written and closed."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


def length_percentiles(lengths: list[int]) -> dict[str, float]:
    """p10, p50 and p90 of completion lengths in tokens (numpy's linear interpolation)."""
    import numpy as np

    if not lengths:
        return {}
    p10, p50, p90 = np.percentile(np.asarray(lengths, dtype=float), [10, 50, 90])
    return {"p10": float(p10), "p50": float(p50), "p90": float(p90)}


def plot_lengths(lengths: list[int], path: Path) -> Path:
    """Histogram of completion lengths (tokens) with p10, p50 and p90 marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if lengths:
        ax.hist(lengths, bins=min(60, max(1, max(lengths) - min(lengths) + 1)),
                color="tab:blue", alpha=0.8)
        pct = length_percentiles(lengths)
        for (name, value), color in zip(pct.items(), ("tab:green", "tab:orange", "tab:red")):
            ax.axvline(value, color=color, lw=1.5, ls="--", label=f"{name} {value:.0f}")
        ax.legend(loc="upper right")
        ax.set_title(f"completion lengths of {len(lengths)} trained samples "
                     f"(p90/p10 = {pct['p90'] / max(pct['p10'], 1e-9):.1f})")
    ax.set_xlabel("completion length (tokens)")
    ax.set_ylabel("completions")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_reward_model(history: list[dict], out_path: Path) -> Path:
    """`asyncrl train-rm`'s training loss and held-out accuracy against step (rm.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), dpi=110, sharex=True)
    loss = [(r["step"], r["loss"]) for r in history if r.get("loss") is not None]
    if loss:
        top.plot(*zip(*loss), color="tab:blue", lw=1.5, label="training loss (mean since last)")
    top.set_ylabel("loss")
    acc = [(r["step"], r["eval_accuracy"]) for r in history
           if r["eval_accuracy"] == r["eval_accuracy"]]  # not NaN
    if acc:
        bottom.plot(*zip(*acc), "o-", color="tab:red", lw=2, label="held-out pairwise accuracy")
        bottom.annotate(f"{acc[-1][1]:.1%}", acc[-1], textcoords="offset points", xytext=(-20, 8))
    bottom.set_ylim(0, 1.02)
    bottom.set_xlabel("reward-model training step")
    bottom.set_ylabel("accuracy")
    top.set_title("asyncrl train-rm")
    return _save(fig, [top, bottom], out_path)
