"""What the experiment trackers cost the learner: its median step time with run.trackers =
[tensorboard, wandb, mlflow] against none, side by side in one run.

The learner side is rank 0's loop as `asyncrl.learner.main` runs it, in this process: one
`train_step` on a batch of fake groups (`asyncrl.testing.make_groups`, the embedded default's
tiny Llama with random weights, --groups x 8 completions) and its metrics.jsonl row written
through `JsonlMonitor`. The trackers are fed as `asyncrl run` feeds them: `TrackerFeed` in
another process (the launcher's), tailing that metrics.jsonl and scraping a Prometheus page
every --interval seconds (run.tracker_interval_s, 10 by default; one generator's metrics,
served here), with wandb offline and MLflow's file store, at the feed's lower priority. Steps
alternate in blocks of --block between "none" (no feed running) and "trackers" (the feed
running), in ABBA order so that a drift of the machine's load cancels; the first block of
each is a warm-up and not counted. Each block's median is kept (`block_medians`): their
spread is the machine's noise.

Reported: the median step time of each, and under `ratios` in --json
`step_s_trackers_over_none` (the target: at most 1.03).

Run from the repository root (about 4 minutes on 2 cores):
    .venv/bin/python -m benchmarks.trackers [--json PATH]
"""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import time
from pathlib import Path

from benchmarks import common


def _parser():
    p = common.doc_parser(__doc__)
    p.add_argument("--blocks", type=int, default=10,
                   help="blocks of each kind (first: warm-up)")
    p.add_argument("--block", type=int, default=12, help="steps per block")
    p.add_argument("--groups", type=int, default=16, help="groups per batch (of 8 completions)")
    p.add_argument("--interval", type=float, default=10.0,
                   help="run.tracker_interval_s (its default)")
    p.add_argument("--threads", type=int, default=1, help="the learner's torch threads")
    p.add_argument("--work-dir", default="~/.cache/asyncrl/bench")
    common.add_json_argument(p)
    return p


def _feed(run_dir: str, url: str, interval: float, ready, stop) -> None:
    """The launcher's side: the tracker feed until `stop` is set."""
    from asyncrl.monitor import TrackerFeed
    from asyncrl.trackers import TrackerSettings

    feed = TrackerFeed(Path(run_dir), TrackerSettings(["tensorboard", "wandb", "mlflow"],
                                                      wandb_mode="offline",
                                                      interval_s=interval),
                       {"learner": {"lr": 1e-5}}, {"generator": [url]}, out=print)
    feed.start()
    feed.ready.wait(120)
    ready.set()
    stop.wait()
    feed.stop()


def _serve_generator_metrics() -> tuple[str, object]:
    from prometheus_client import CollectorRegistry

    from asyncrl import metrics

    registry = CollectorRegistry()
    m = metrics.GeneratorMetrics(registry)
    m.generated_tokens.inc(1000)
    port = common.free_port()
    return f"http://127.0.0.1:{port}/metrics", metrics.serve(registry, "127.0.0.1", port)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    import numpy as np
    import torch

    from asyncrl import testing
    from asyncrl.config import LearnerConfig
    from asyncrl.learner.batch import collate
    from asyncrl.learner.model import load_policy
    from asyncrl.learner.step import Models, train_step
    from asyncrl.monitor import JsonlMonitor

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# learner step time with and without the trackers  ({common.machine()})")
    model, tok = load_policy(testing.build_tiny_model(
        Path(args.work_dir).expanduser() / "tiny-random"), "float32")
    model.train()
    lc = LearnerConfig()
    models = Models(model, torch.optim.AdamW(model.parameters(), lr=lc.lr))
    rng = np.random.default_rng(0)
    batches = [collate(testing.make_groups(args.groups, 8, rng=rng, min_token=3,
                                           vocab_size=model.config.vocab_size,
                                           prompt_len=7, completion_len=(1, 16)),
                       tok.pad_token_id) for _ in range(4)]
    url, server = _serve_generator_metrics()
    times: dict[str, list[float]] = {"none": [], "trackers": []}
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        out = JsonlMonitor(Path(tmp) / "metrics.jsonl")
        step = 0
        blocks = []
        for pair in range(args.blocks):  # ABBA order, so a drift of the machine cancels
            blocks += ["none", "trackers"] if pair % 2 == 0 else ["trackers", "none"]
        per_block: dict[str, list[float]] = {"none": [], "trackers": []}
        for block, kind in enumerate(blocks):
            ready, stop = ctx.Event(), ctx.Event()
            feed = (ctx.Process(target=_feed, args=(tmp, url, args.interval, ready, stop))
                    if kind == "trackers" else None)
            if feed is not None:
                feed.start()
                ready.wait(180)  # the trackers are open before the block is timed
            mine = []
            for _ in range(args.block):
                step += 1
                t0 = time.perf_counter()
                stats = train_step(models, batches[step % len(batches)], lc, 1.0, 16)
                out.log({"step": step, "reward_mean": stats["reward_mean"],
                         "tokens_per_s": 1.0, **{k: v for k, v in stats.items()
                                                 if isinstance(v, float)}}, step)
                if block >= 2:
                    times[kind].append(time.perf_counter() - t0)
                    mine.append(times[kind][-1])
            if mine:
                per_block[kind].append(common.median(mine))
            if feed is not None:
                stop.set()
                feed.join(120)
            print(f"block {block + 1}/{len(blocks)} ({kind}): median step "
                  f"{common.median(mine) if mine else float('nan'):.4f}s (warm-up if nan)",
                  flush=True)
    server.shutdown()
    none_s, with_s = common.median(times["none"]), common.median(times["trackers"])
    print(common.table(["trackers", "steps", "median step s"],
                       [["none", len(times["none"]), f"{none_s:.4f}"],
                        ["tensorboard, wandb, mlflow", len(times["trackers"]), f"{with_s:.4f}"]]))
    ratio = with_s / none_s
    print(f"step time with the trackers / without: {ratio:.3f} (target <= 1.03)")
    common.write_json(args.json, {"median_step_s_none": none_s,
                                  "median_step_s_trackers": with_s,
                                  "steps_each": len(times["none"]),
                                  "block_medians": per_block},
                      {"step_s_trackers_over_none": ratio})


if __name__ == "__main__":
    main()
