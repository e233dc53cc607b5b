"""Async against strict sync: time to a held-out accuracy, samples/s, and how busy each role is.

Both sides are whole runs of --config (configs/default.yaml unless given; docs/performance.md
section 4 also measures configs/reasoning.yaml, the long-tail task where generation is most of
a step), started by `asyncrl run`'s own code path (`asyncrl.runner.execute_run`), with the
two settings of the staleness study (`asyncrl.study.grid`):
- async: generator.on_policy=false, buffer.max_staleness=M (--max-staleness, default 2),
  buffer.admit_steps=max(1, M), learner.offpolicy=--correction (default none), the config's
  streaming generator and in-flight updates;
- sync: generator.on_policy=true, buffer.max_staleness=0: the generator makes one learner
  batch under the current weights, then waits for the next ones (strictly on-policy), same code
  otherwise.
Same seed (learner.seed = generator.seed) and config otherwise; learner.eval_interval is
--eval-interval (default 5) so the time to the target is resolved to a few steps, and
learner.total_steps is --steps. The pairs alternate their order (async, sync, sync, async, ...)
so that a drift in the machine's load does not favour one side.

Time to target: `elapsed_s` of the first metrics.jsonl row whose `eval_accuracy` >= --target,
i.e. when the learner had made the first version that scores it (evaluations run on the
generator and are joined to their version's row, so the learner never waits for them; in sync
mode an evaluation delays the generator's next batch, which is part of that side's time).
elapsed_s counts from the moment every generator has joined the weight-sync group. Choose a
target both sides reach late in their runs: one reached at the first evaluations measures
start-up, not learning.

Utilisation, as fractions of the run's RL wall time (elapsed_s of the last row):
- learner busy: the sum over steps of step_s - data_wait_s + sync_s (computing steps, pushing
  weights);
- generator busy: the engine's busy time (`asyncrl_generator_engine_busy_seconds_total`, engine
  steps while streaming), scraped from each generator's /metrics (net.base_port+20+i) every
  --scrape-s seconds while the run goes and interpolated at the start and end of the RL window
  (the window's start on the benchmark's clock is recovered from when each metrics.jsonl row
  appeared); evaluations are part of it. `gen load` is the engine's weight receive and reload
  (`asyncrl_sync_receive_seconds`), which the learner's sync_s includes.

--posthoc takes evaluation out of both loops: learner.eval_interval is --steps (the loop
evaluates only version 0 and the last) and learner.checkpoint_interval is --eval-interval; after
every run is done, each checkpoint is reloaded into one vLLM engine and evaluated as a
generator does (`Evaluator.run_blocking`: same held-out split, prompts, greedy decoding and
scoring) and its accuracy joined into its step's row (RUN_DIR/posthoc_evals.json); the last
step's in-loop evaluation is printed beside it as a check that a checkpoint is the version the
generators held. On 2 cores an in-loop evaluation takes the engine from training samples for
~10 s per 512 problems, which the async learner then waits for and the sync one pays too;
--posthoc measures the two schedules as they would run with evaluation on hardware of its own.

Each role runs on one CPU thread on both sides (learner.threads = generator.threads = 1): async
runs both roles at once on 2 cores. --sync-threads N gives each role N threads on the sync side
only, where one role waits while the other computes, so the sync baseline can use the whole
machine in each role's turn (the fairest strict-sync baseline on a CPU box).

With --json PATH the medians and, under `ratios`, sync_over_async_time_to_target (target >= 2),
sync_over_async_s_per_step, async_over_sync_samples_per_s and
async_over_sync_trained_tokens_per_s are written there. Samples/s counts completions trained;
trained tokens/s weighs them by length, which matters where stale completions are dropped:
those are the long ones (a completion that runs over max_staleness versions goes stale), so
async's steps can be cheaper than sync's by training shorter completions (the `dropped`
column: completions dropped as stale).

Run dirs go under --out (default /tmp/asyncrl-bench-async/<time>/); each run gets base ports of
its own. Run from the repository root (default config: 3-4 min per pair on 2 cores; reasoning:
~12 min per pair):
    .venv/bin/python -m benchmarks.async_vs_sync [--seeds 0,1,2] [key=value ...]
    .venv/bin/python -m benchmarks.async_vs_sync --config configs/reasoning.yaml --steps 80 \
        --eval-interval 10 --target 0.71 --json async_vs_sync.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import urllib.request
from dataclasses import astuple, dataclass, field
from pathlib import Path

from benchmarks import common
from benchmarks.common import free_base_port


def _parser() -> argparse.ArgumentParser:
    p = common.doc_parser(__doc__)
    common.add_run_arguments(p)
    p.add_argument("--steps", type=int, default=60, help="learner.total_steps of every run")
    p.add_argument("--eval-interval", type=int, default=5, help="learner.eval_interval")
    p.add_argument("--max-staleness", type=int, default=2, help="buffer bound of the async side")
    p.add_argument("--correction", default="none", help="learner.offpolicy of the async side")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; a pair per seed")
    p.add_argument("--repeats", type=int, default=1, help="async/sync pairs per seed")
    p.add_argument("--json", metavar="PATH", help="write the figures and ratios here")
    p.add_argument("--scrape-s", type=float, default=1.0, help="generator metrics scrape period")
    p.add_argument("--out", default="/tmp/asyncrl-bench-async")
    p.add_argument("--posthoc", action="store_true",
                   help="evaluate checkpoints after the runs instead of in the loop")
    p.add_argument("--sync-threads", type=int, default=1,
                   help="CPU threads of each role on the sync side (it runs one role at a "
                        "time, so each can have the whole machine in its turn)")
    p.add_argument("--report-only", metavar="DIR",
                   help="print the report of the finished runs in DIR again, without running")
    return p


# ------------------------------------------------------------------ during a run


def parse_prometheus(text: str) -> dict[str, float]:
    """Sample name (with its labels, as written) -> value, from the text exposition format."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


@dataclass
class Sample:
    t: float  # time.time() of the scrape
    busy_s: float  # asyncrl_generator_engine_busy_seconds_total, summed over generators
    load_s: float  # asyncrl_sync_receive_seconds_sum


@dataclass
class Watch:
    """Scrapes the generators' /metrics and notes when each metrics.jsonl row appears."""

    metrics_path: Path
    ports: list[int]
    scrape_s: float
    samples: list[Sample] = field(default_factory=list)
    row_seen: dict[int, float] = field(default_factory=dict)  # step -> time.time()
    _stop: threading.Event = field(default_factory=threading.Event)
    _offset: int = 0

    def __enter__(self) -> Watch:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        next_scrape = 0.0
        while not self._stop.wait(0.1):
            self._read_rows()
            if time.monotonic() >= next_scrape:
                next_scrape = time.monotonic() + self.scrape_s
                self._scrape()

    def _read_rows(self) -> None:
        if not self.metrics_path.exists():
            return
        with self.metrics_path.open("rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        now = time.time()
        for line in complete.splitlines():
            self.row_seen[json.loads(line)["step"]] = now

    def _scrape(self) -> None:
        t = time.time()
        values = []
        for port in self.ports:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                            timeout=2) as r:
                    values.append(parse_prometheus(r.read().decode()))
            except OSError:  # not up yet, or already stopped: keep the latest sample
                return
        self.samples.append(Sample(
            t, *(sum(v.get(k, 0.0) for v in values) for k in (
                "asyncrl_generator_engine_busy_seconds_total",
                "asyncrl_sync_receive_seconds_sum"))))


# ------------------------------------------------------------------ after a run

POSTHOC = "posthoc_evals.json"  # checkpoint step -> greedy held-out accuracy


def join_posthoc(rows: list[dict], accuracy: dict[int, float]) -> None:
    """Put each checkpoint's accuracy into its step's row as eval_accuracy; the in-loop
    evaluations of the other rows are dropped (row 0 keeps the SFT policy's), so that time to
    target reads the checkpoints alone. The last row's in-loop value stays as inloop_accuracy."""
    for r in rows[1:]:
        if "eval_accuracy" in r:
            r["inloop_accuracy"] = r.pop("eval_accuracy")
        if r["step"] in accuracy:
            r["eval_accuracy"] = accuracy[r["step"]]


def _checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    # complete ones only: asyncrl_state.json is written last (asyncrl/learner/checkpoint.py)
    steps = [(int(d.name.removeprefix("step_")), d) for d in (run_dir / "checkpoints").glob(
        "step_*") if d.name.removeprefix("step_").isdigit()
        and (d / "asyncrl_state.json").is_file()]
    if not steps:
        raise RuntimeError(f"{run_dir} has no checkpoints to evaluate")
    return sorted(steps)


def evaluate_checkpoints(run_dirs: list[Path]) -> None:
    """Greedy held-out accuracy of every checkpoint of finished runs of one config, saved to
    RUN_DIR/POSTHOC: one vLLM engine, as the generators' (`Evaluator.run_blocking`: the same
    prompts, scoring and max_tokens), reloading each checkpoint into it."""
    import os

    from asyncrl.config import load_config
    from asyncrl.generator.engine import configure_cpu_env, on_gpu

    cfg = load_config(run_dirs[0] / "config.yaml")
    gc = cfg.generator
    if not on_gpu():
        configure_cpu_env(gc.kv_cache_gib, os.cpu_count() or 1)
    from transformers import AutoTokenizer

    from asyncrl.generator.engine import VLLMEngine
    from asyncrl.generator.evaluate import Evaluator
    from asyncrl.task import load_task

    first = _checkpoints(run_dirs[0])[0][1]
    tok = AutoTokenizer.from_pretrained(first)
    _, held_out = load_task(cfg.task)
    evaluator = Evaluator.for_task(cfg, tok, held_out)
    engine = VLLMEngine(str(first), cfg.model.dtype, gc.seed, max(map(len, evaluator.prompts))
                        + gc.max_tokens + 8, gc.gpu_memory_utilization, gpu=on_gpu())
    for run_dir in run_dirs:
        out = {}
        for step, d in _checkpoints(run_dir):
            engine.load_dir(str(d))  # as the evaluator loads (generator.eval_engine)
            evaluator.ask(step)
            out[step] = evaluator.run_blocking(engine, step).accuracy
            print(f"[bench] {run_dir.name} {d.name}: held-out accuracy {out[step]:.3f}",
                  flush=True)
        (run_dir / POSTHOC).write_text(json.dumps(out))


@dataclass
class Run:
    order: int
    setting: str
    seed: int
    rows: list[dict]
    samples: list[Sample]
    row_seen: dict[int, float]
    run_dir: Path

    @classmethod
    def load(cls, run_dir: Path) -> Run:
        """A finished run from its directory, <order>-<setting>-seed<k>/, and the scrapes
        saved in it (bench_watch.json)."""
        order, rest = run_dir.name.split("-", 1)
        setting, seed = rest.rsplit("-seed", 1)
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        posthoc = run_dir / POSTHOC
        if posthoc.exists():
            join_posthoc(rows, {int(k): v for k, v in json.loads(posthoc.read_text()).items()})
        watch = json.loads((run_dir / "bench_watch.json").read_text())
        return cls(int(order), setting, int(seed), rows,
                   [Sample(*x) for x in watch["samples"]],
                   {int(k): v for k, v in watch["row_seen"].items()}, run_dir)

    def threads(self) -> dict[str, int] | None:
        """CPU threads of each role, from the run's resolved config.yaml (None without it)."""
        path = self.run_dir / "config.yaml"
        if not path.exists():
            return None
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(path)
        return {"learner": int(cfg.learner.threads), "generator": int(cfg.generator.threads)}

    @property
    def wall_s(self) -> float:
        return self.rows[-1]["elapsed_s"]

    def to_target(self, target: float) -> tuple[int, float] | None:
        """(step, elapsed_s) of the first row after step 0 whose evaluation is >= target (the
        SFT policy's row 0 is where learning starts, not a time to it)."""
        for r in self.rows[1:]:
            if r.get("eval_accuracy", -1) >= target:
                return r["step"], r["elapsed_s"]
        return None

    def step_s(self) -> float:
        """Mean wall time per step over the whole run."""
        return self.wall_s / (len(self.rows) - 1)

    def trained_tokens_per_s(self) -> float:
        """Completion tokens trained on per second of RL wall time."""
        return sum(r["tokens"] for r in self.rows[1:]) / self.wall_s

    def samples_per_s(self) -> float:
        """Completions trained on per second of RL wall time."""
        return self.rows[-1]["samples_trained"] / self.wall_s

    def learner_busy_s(self) -> float:
        return sum(r["step_s"] - r["data_wait_s"] + (r["sync_s"] or 0) for r in self.rows[1:])

    def window(self) -> tuple[float, float]:
        """The RL window [t_start, t_end] on this process's clock. A row without evaluation is
        written right after its elapsed_s is taken, so it appears at t_start + elapsed_s plus
        the polling delay; the smallest difference is the best estimate of t_start."""
        rows = {r["step"]: r for r in self.rows}
        t0 = min(t - rows[k]["elapsed_s"] for k, t in self.row_seen.items()
                 if k > 0 and "eval_accuracy" not in rows[k])
        return t0, t0 + self.wall_s

    def generator_delta(self) -> Sample:
        """Engine busy seconds and load seconds inside the RL window."""
        t0, t1 = self.window()
        a, b = _at(self.samples, t0), _at(self.samples, t1)
        return Sample(t1 - t0, b.busy_s - a.busy_s, b.load_s - a.load_s)


def _at(samples: list[Sample], t: float) -> Sample:
    """The cumulative counters at time t, linearly interpolated between scrapes."""
    if not samples or t <= samples[0].t:
        return Sample(t, 0.0, 0.0)  # before the first scrape nothing was generated yet
    for a, b in zip(samples, samples[1:]):
        if a.t <= t <= b.t:
            w = (t - a.t) / (b.t - a.t)
            return Sample(t, *(x + w * (y - x) for x, y in (
                (a.busy_s, b.busy_s), (a.load_s, b.load_s))))
    return samples[-1]


# ------------------------------------------------------------------ main


def side_overrides(setting, sync_threads: int) -> list[str]:
    """The setting's overrides, with --sync-threads for both roles on the sync side."""
    extra = ([f"learner.threads={sync_threads}", f"generator.threads={sync_threads}"]
             if setting.name == "sync" and sync_threads != 1 else [])
    return [*setting.overrides, *extra]


def run_one(args, setting, seed: int, order: int, out_dir: Path) -> Run:
    from asyncrl.config import load_config
    from asyncrl.runner import execute_run

    run_dir = out_dir / f"{order}-{setting.name}-seed{seed}"
    probe = load_config(args.config, args.overrides)
    base = free_base_port(probe.generator.num_generators, probe.learner.nproc)
    evals = ([f"learner.eval_interval={args.steps}",
              f"learner.checkpoint_interval={args.eval_interval}"] if args.posthoc
             else [f"learner.eval_interval={args.eval_interval}"])
    cfg = load_config(args.config, [
        *args.overrides, *side_overrides(setting, args.sync_threads),
        f"learner.total_steps={args.steps}", *evals,
        f"learner.seed={seed}",
        f"generator.seed={seed}", f"net.base_port={base}", f"run_dir={run_dir}"])
    ports = [cfg.net.generator_metrics_port(i) for i in range(cfg.generator.num_generators)]
    print(f"[bench] run {order}: {setting.name}, seed {seed}, base port {base}, {run_dir}",
          flush=True)
    with Watch(run_dir / "metrics.jsonl", ports, args.scrape_s) as watch:
        code = execute_run(cfg, out=lambda line: print(f"  {line}", flush=True))
    if code != 0:
        raise RuntimeError(f"run {run_dir} failed with exit code {code}; see its logs/")
    (run_dir / "bench_watch.json").write_text(json.dumps({
        "samples": [astuple(x) for x in watch.samples], "row_seen": watch.row_seen}))
    return Run.load(run_dir)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    import asyncrl
    from asyncrl.config import load_config
    from asyncrl.runner import resolve_model
    from asyncrl.study import grid
    from benchmarks.common import machine

    if args.report_only:
        runs = sorted((Run.load(d) for d in Path(args.report_only).iterdir()
                       if (d / "bench_watch.json").exists()), key=lambda r: r.order)
        names = sorted({r.setting for r in runs}, key=lambda n: n == "sync")
        report(runs, args.target, names[-1], names[0], args.json)
        return
    from asyncrl.config.schema import ConfigError

    sync, async_ = grid([args.max_staleness], [args.correction])
    for setting in (sync, async_):  # a bad override fails here, not after the first side's run
        try:
            load_config(args.config, [*args.overrides,
                                      *side_overrides(setting, args.sync_threads)])
        except (ConfigError, OSError) as e:
            raise SystemExit(f"async_vs_sync: {setting.name} side: {e}") from None
    print(f"# async vs sync, time to {args.target:.0%} held-out accuracy  ({machine()})",
          flush=True)
    resolve_model(load_config(args.config, args.overrides))  # build the SFT model once, cached
    out_dir = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    runs: list[Run] = []
    pairs = [seed for seed in map(int, args.seeds.split(",")) for _ in range(args.repeats)]
    for i, seed in enumerate(pairs):
        for setting in ((async_, sync) if i % 2 == 0 else (sync, async_)):
            runs.append(run_one(args, setting, seed, len(runs) + 1, out_dir))
    if args.posthoc:  # after every timed run, so that it loads none of them
        evaluate_checkpoints([r.run_dir for r in runs])
        runs = [Run.load(r.run_dir) for r in runs]
    print(f"\n# async vs sync, time to {args.target:.0%} held-out accuracy  ({machine()})")
    when = " (checkpoints, evaluated after the runs)" if args.posthoc else ""
    if args.sync_threads != 1:
        when += f"; sync side: {' '.join(side_overrides(sync, args.sync_threads)[-2:])}"
    print(f"{args.config} {' '.join(args.overrides)}, {args.steps} steps, eval every "
          f"{args.eval_interval}{when}; async = {async_.name} ({' '.join(async_.overrides)}); "
          f"asyncrl from {Path(asyncrl.__file__).parent}; run dirs in {out_dir}")
    report(runs, args.target, sync.name, async_.name, args.json)


def report(runs: list[Run], target: float, sync_name: str, async_name: str,
           json_path: str | None = None) -> None:
    from benchmarks.common import table, write_json

    rows, util = [], []
    for r in runs:
        hit = r.to_target(target)
        evals = [x["eval_accuracy"] for x in r.rows if "eval_accuracy" in x]
        rows.append([r.order, r.setting, r.seed,
                     *([hit[0], f"{hit[1]:.1f}"] if hit else ["-", "not reached"]),
                     f"{evals[0]:.3f}", f"{evals[-1]:.3f}", f"{max(evals):.3f}",
                     f"{r.wall_s:.1f}", f"{r.step_s():.2f}", f"{r.samples_per_s():.1f}",
                     f"{r.trained_tokens_per_s():.0f}",
                     r.rows[-1].get("stale_dropped_total", 0)])
        g = r.generator_delta()
        steps = r.rows[1:]
        util.append([r.order, r.setting, f"{r.learner_busy_s() / r.wall_s:.0%}",
                     f"{g.busy_s / r.wall_s:.0%}", f"{g.load_s / r.wall_s:.0%}",
                     f"{_med(steps, lambda x: x['step_s'] - x['data_wait_s']):.2f}",
                     f"{_med(steps, lambda x: x['data_wait_s']):.2f}",
                     f"{_med(steps, lambda x: x['sync_s'] or 0):.3f}",
                     f"{g.load_s / max(1, len(steps)):.3f}",
                     f"{statistics.mean(x['staleness_mean'] for x in steps):.2f}"])
    checks = [(r.order, r.rows[-1]["inloop_accuracy"], r.rows[-1]["eval_accuracy"])
              for r in runs if "inloop_accuracy" in r.rows[-1] and "eval_accuracy" in r.rows[-1]]
    if checks:
        print("\nlast step, evaluated in the loop and from its checkpoint after the runs: "
              + ", ".join(f"run {o}: {a:.3f} / {b:.3f}" for o, a, b in checks))
        if any(abs(a - b) > 0.01 for _, a, b in checks):
            print("warning: the two evaluations of the same version differ by more than a point")
    print(f"\ntime to {target:.0%} held-out accuracy, s of RL wall time")
    if any(r.rows[0].get("eval_accuracy", -1) >= target for r in runs):
        print(f"warning: the SFT policy already scores >= {target:.0%} in some runs: that time "
              "measures noise around the start, not learning; choose a target both sides reach "
              "late in their runs")
    print(table(["run", "setting", "seed", "step", "time to target", "first acc", "final acc",
                 "best acc", "wall s", "s/step", "samples/s", "trained tok/s", "dropped"],
                rows))
    print("\nutilisation (fractions of the wall time) and per-step medians (s)")
    print(table(["run", "setting", "learner busy", "gen busy", "gen load", "step compute",
                 "data wait", "sync_s", "gen load/step", "staleness"], util))
    print()
    names = (async_name, sync_name)
    ratios = {}
    time_ratio = _compare({n: [r.to_target(target) for r in runs if r.setting == n]
                           for n in names}, "time to target", lambda h: h[1], sync_name,
                          async_name)
    if time_ratio is not None:
        ratios["sync_over_async_time_to_target"] = time_ratio
        print(f"{'':>14} target >= 2x: {'met' if time_ratio >= 2 else 'not met'}")
    _compare({n: [r.to_target(target) for r in runs if r.setting == n] for n in names},
             "steps to target", lambda h: h[0], sync_name, async_name)
    ratios["sync_over_async_s_per_step"] = _compare(
        {n: [(r.step_s(),) for r in runs if r.setting == n] for n in names},
        "s per step over the whole run", lambda h: h[0], sync_name, async_name)
    per_s = _compare({n: [(r.samples_per_s(),) for r in runs if r.setting == n] for n in names},
                     "samples/s", lambda h: h[0], sync_name, async_name)
    ratios["async_over_sync_samples_per_s"] = 1 / per_s  # both sides ran: never None
    print(f"{'':>14} (samples/s: async / sync = {1 / per_s:.2f}x)")
    tok_s = _compare({n: [(r.trained_tokens_per_s(),) for r in runs if r.setting == n]
                      for n in names}, "trained tokens/s", lambda h: h[0], sync_name, async_name)
    ratios["async_over_sync_trained_tokens_per_s"] = 1 / tok_s
    print(f"{'':>14} (trained tokens/s: async / sync = {1 / tok_s:.2f}x)")
    figures = {}
    for name in names:
        mine = [r for r in runs if r.setting == name]
        busy = [r.learner_busy_s() / r.wall_s for r in mine]
        gen = [r.generator_delta().busy_s / r.wall_s for r in mine]
        hits = [r.to_target(target) for r in mine]
        figures[name] = {"time_to_target_s": [h[1] if h else None for h in hits],
                         "steps_to_target": [h[0] if h else None for h in hits],
                         "s_per_step": [r.step_s() for r in mine],
                         "samples_per_s": [r.samples_per_s() for r in mine],
                         "trained_tokens_per_s": [r.trained_tokens_per_s() for r in mine],
                         "stale_dropped": [r.rows[-1].get("stale_dropped_total", 0)
                                           for r in mine],
                         "learner_busy": busy, "generator_busy": gen,
                         "threads": [r.threads() for r in mine],
                         "seeds": [r.seed for r in mine]}
        print(f"{name:>14} utilisation: learner {statistics.mean(busy):.0%}, generator "
              f"{statistics.mean(gen):.0%} (mean of {len(mine)} runs)")
    write_json(json_path, {"target": target, **figures}, ratios)


def _compare(hits: dict[str, list], label: str, pick, sync_name: str,
             async_name: str) -> float | None:
    """Print each setting's median of pick(hit) and the ratio sync / async of the medians."""
    values = {}
    for name, hs in hits.items():
        values[name] = [pick(h) for h in hs if h is not None]
        missed = sum(h is None for h in hs)
        print(f"{name:>14} {label}: "
              + (f"median {statistics.median(values[name]):.2f} of "
                 f"{', '.join(f'{v:.2f}' for v in values[name])}" if values[name] else "-")
              + (f" ({missed} of {len(hs)} runs did not reach it)" if missed else ""))
    if not (values[sync_name] and values[async_name]) or statistics.median(
            values[async_name]) == 0:
        return None
    ratio = statistics.median(values[sync_name]) / statistics.median(values[async_name])
    pairs = ""  # the i-th run of each setting belong to the same pair (run side by side)
    if all(h is not None for hs in hits.values() for h in hs):
        pairs = ", per pair " + ", ".join(
            f"{s / a:.2f}" for s, a in zip(values[sync_name], values[async_name]))
    print(f"{'ratio':>14} sync / async: {ratio:.2f}x (of the medians{pairs})")
    return ratio


def _med(rows: list[dict], f) -> float:
    return statistics.median(f(r) for r in rows)


if __name__ == "__main__":
    main()
