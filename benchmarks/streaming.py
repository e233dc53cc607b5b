"""Streaming against batch generation, with each in-flight update mode
(docs/performance.md section 9).

The generator alone on the reasoning task's SFT model (configs/reasoning.yaml,
`builtin:tiny-reasoning`: scratchpad completions of very different lengths, max_tokens 224),
in four modes, one after the other in one run:
  batch   generator.streaming=false: the batch loop, one blocking generate call of
          prompts_per_call x group_size completions, then score, send, wait for the ack;
  keep    generator.streaming=true generator.inflight_update=keep (continuous batching up to
          generator.max_inflight sequences; running requests keep their KV cache over a load);
  abort   ... inflight_update=abort (running requests aborted, resubmitted after the load);
  drain   ... inflight_update=drain (running requests finish under the old weights first).
batch runs prompts_per_call x group_size = 64 sequences per call and streaming keeps up to
max_inflight = 64 running, so both hold the engine to the same concurrency.

Each mode runs the real roles: `python -m asyncrl buffer` and `python -m asyncrl generator
--index 0` as subprocesses (each in its own session) on a config of its own (a free
net.base_port, a temporary run_dir with the run's CURVE keys, buffer.max_staleness=10**6 so
nothing is dropped, buffer.admit_steps=4 so that back-pressure does not throttle the generator
while the stand-in learner pushes). The stand-in learner is this process and does not train:
a `transport.Client` to the buffer's learner port asks for `learner.groups_per_step` groups at
a time (`batch_request`, every 20 ms while the reply is not_ready, as the learner does), and
after every --push-every batches the real `asyncrl.sync.sender.WeightSender` pushes the SAME
weights as the next policy version (`sync(model, version, due=True)`, which waits until the
engine has loaded them), so every mode loads weights equally often per batch consumed. Every
load is followed by the generator's sync probe, as in a real run.

Warm-up lasts until the stand-in learner has its first batch (engine started, first groups
delivered); the measured period is the --seconds after it. The generator's Prometheus endpoint
(net.base_port+20) and its CPU time (/proc) are scraped every 0.25 s, and every figure is a
difference over the window from the first to the last delivery to the buffer inside that
period (lump to lump: a batch-mode generator delivers a whole generate call at once, and
counting whole calls keeps the window's edges from biasing its rate):
  samples/s, tokens/s   completions acknowledged by the buffer
                        (`asyncrl_generator_trajectories_sent_total`) and completion tokens
                        sent (`..._generated_tokens_total`) per second; in steady state what a
                        learner is handed. consumed/s: completions in the stand-in learner's
                        batches over the whole period (a check; coarse, 128 per batch);
  engine busy           `asyncrl_generator_engine_busy_seconds_total` (time inside generate
                        calls, or inside the streaming loop's engine steps) per second. It
                        leaves out the steps drain mode runs before a load (in the rollout's
                        before_update, called by the weight-sync member) and the sync probe
                        after each load, so
                        it under-counts drain; gen CPU, the generator process's CPU seconds per
                        second, does not;
  tok/busy-s            generated tokens per second of engine busy time;
  running               sequences per engine step: streaming, the mean of
                        `asyncrl_generator_inflight_sequences`; batch, from each whole generate
                        call consumed, sum / max of its completion lengths (a call runs as many
                        decode steps as its longest completion);
  first tok->buffer s   `asyncrl_generator_group_delivery_seconds` sum / count: from a group's
                        first sampled token (batch: the start of its generate call) to the
                        buffer's ack;
  in-flight upd         `asyncrl_generator_inflight_updates_total` (loads that found sequences
                        running); pushes and push s: the stand-in learner's pushes and their
                        mean time (from the announcement until the engine has loaded: it
                        includes waiting for the generator to reach a point where it loads);
                        busy: the buffer's "busy" answers (back-pressure).
With --reps N the modes run N rounds, each round in a rotated order, and each figure is the
median over rounds. The ratios are each streaming mode's samples/s over batch's.

The machine has 2 cores: the generator's engine takes one thread (generator.threads=1); the
buffer and this stand-in learner (one torch thread, no training: it only packs and broadcasts
the tiny model's weights at each push) share the other.

Run from the repository root (about 15 min with the defaults on this machine: per mode ~25 s
start-up, 30-90 s to the first batch, then --seconds):
    .venv/bin/python -m benchmarks.streaming [--seconds 150] [--push-every 1] [--reps 1]
        [--json PATH] [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks import common

MODES = {
    "batch": ["generator.streaming=false"],
    "keep": ["generator.streaming=true", "generator.inflight_update=keep"],
    "abort": ["generator.streaming=true", "generator.inflight_update=abort"],
    "drain": ["generator.streaming=true", "generator.inflight_update=drain"],
}
BENCH_SETTINGS = ["buffer.max_staleness=1000000", "buffer.admit_steps=4"]
FIRST_BATCH_TIMEOUT_S = 600.0  # engine start + the first batch, on a loaded machine


def _parser() -> argparse.ArgumentParser:
    p = common.doc_parser(__doc__)
    p.add_argument("overrides", nargs="*", help="key=value overrides for every mode")
    p.add_argument("--config", default="configs/reasoning.yaml")
    p.add_argument("--seconds", type=float, default=150.0,
                   help="measured period per mode, after the first batch")
    p.add_argument("--push-every", type=int, default=1, metavar="K",
                   help="push the same weights as a new version after every K batches")
    p.add_argument("--reps", type=int, default=1, help="rounds of all modes (medians)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of "
                   f"{', '.join(MODES)}")
    p.add_argument("--keep-runs", action="store_true",
                   help="keep each mode's run directory (logs, gen0_stats.json)")
    common.add_json_argument(p)
    return p


# ------------------------------------------------------------------ figures

SENT = "asyncrl_generator_trajectories_sent_total"  # completions the buffer acknowledged
TOKENS = "asyncrl_generator_generated_tokens_total"
BUSY = "asyncrl_generator_engine_busy_seconds_total"
DELIVERY = "asyncrl_generator_group_delivery_seconds"
RUNNING = "asyncrl_generator_inflight_sequences"


@dataclass
class Scrape:
    t: float  # time.monotonic()
    values: dict[str, float]  # the generator's /metrics
    cpu_s: float  # the generator process's user + system CPU seconds


@dataclass
class Result:
    mode: str
    window_s: float  # from the first to the last arrival at the buffer inside the window
    samples_per_s: float
    tokens_per_s: float
    consumed_per_s: float  # completions in the stand-in learner's batches (whole batches)
    engine_busy: float  # fraction of the window
    generator_cpu: float  # CPU seconds of the generator process per second
    delivery_s: float  # mean, a group's first token -> the buffer's ack
    tokens_per_busy_s: float
    running: float  # mean sequences in the engine per engine step
    inflight_updates: int
    pushes: int
    push_s: float  # mean seconds of one push (announce, broadcast, load confirmed)
    busy_retries: int
    lengths: list[int] = field(repr=False)  # completion lengths of the groups consumed


def percentile(xs: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation between order statistics."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def event_window(ts: list[float], counts: list[float], t_open: float, t_close: float
                 ) -> tuple[int, int] | None:
    """Indices of the first and last sample in [t_open, t_close] at which the counter moved.
    A batch-mode generator delivers one lump per generate call, so a rate taken from lump to
    lump (not from t_open to t_close) counts whole cycles and is not biased by where the window
    edges fall; None with fewer than two lumps."""
    moved = [i for i in range(1, len(ts))
             if t_open <= ts[i] <= t_close and counts[i] != counts[i - 1]]
    return (moved[0], moved[-1]) if len(moved) >= 2 else None


def mean_running(calls: list[list[int]]) -> float:
    """Sequences per engine step of batch generate calls, from each call's completion lengths:
    a call runs max(lengths) decode steps and produces sum(lengths) tokens."""
    steps = sum(max(c) for c in calls if c)
    return sum(map(sum, calls)) / steps if steps else float("nan")


def summarise(mode: str, scrapes: list[Scrape], t_open: float, t_close: float,
              consumed: list[tuple[float, int]], calls: list[list[int]], lengths: list[int],
              push_s: list[float]) -> Result:
    """consumed: (time, completions) of each batch after the first (which opened the window).
    calls: the completion lengths of each whole generate call consumed (batch mode)."""
    ts = [s.t for s in scrapes]
    w = event_window(ts, [s.values.get(SENT, 0.0) for s in scrapes], t_open, t_close)
    if w is None:
        raise RuntimeError(f"{mode}: fewer than two deliveries to the buffer in the window; "
                           "raise --seconds")
    a, b = scrapes[w[0]], scrapes[w[1]]
    window = b.t - a.t

    def d(name: str) -> float:
        return b.values.get(name, 0.0) - a.values.get(name, 0.0)

    busy, n_deliveries = d(BUSY), d(f"{DELIVERY}_count")
    inside = [s.values.get(RUNNING, 0.0) for s in scrapes if a.t <= s.t <= b.t]
    in_window = [n for t, n in consumed if t <= t_close]
    return Result(
        mode=mode, window_s=window, samples_per_s=d(SENT) / window,
        tokens_per_s=d(TOKENS) / window,
        consumed_per_s=sum(in_window) / (t_close - t_open),
        engine_busy=busy / window, generator_cpu=(b.cpu_s - a.cpu_s) / window,
        delivery_s=d(f"{DELIVERY}_sum") / n_deliveries if n_deliveries else float("nan"),
        tokens_per_busy_s=d(TOKENS) / busy if busy else float("nan"),
        running=mean_running(calls) if mode == "batch" else statistics.mean(inside),
        inflight_updates=round(d("asyncrl_generator_inflight_updates_total")),
        pushes=len(push_s), push_s=statistics.mean(push_s) if push_s else float("nan"),
        busy_retries=round(d("asyncrl_generator_busy_retries_total")), lengths=lengths)


# ------------------------------------------------------------------ one mode


class Scraper(threading.Thread):
    """Scrapes the generator's /metrics (and its CPU time) every `period_s` seconds."""

    def __init__(self, port: int, pid: int, period_s: float = 0.25):
        super().__init__(daemon=True, name="bench-scrape")
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.stat = Path(f"/proc/{pid}/stat")
        self.period_s = period_s
        self.scrapes: list[Scrape] = []
        self._done = threading.Event()

    def run(self) -> None:
        from benchmarks.async_vs_sync import parse_prometheus

        tick = os.sysconf("SC_CLK_TCK")
        while not self._done.wait(self.period_s):
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    text = r.read().decode()
                # utime and stime: fields 14 and 15, counted after the ")" ending the name
                fields = self.stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # not up yet, or gone
            self.scrapes.append(Scrape(time.monotonic(), parse_prometheus(text),
                                       (int(fields[11]) + int(fields[12])) / tick))

    def stop(self) -> None:
        self._done.set()
        self.join()


class Roles:
    """The buffer and generator subprocesses of one mode, each in a session of its own."""

    def __init__(self, config_path: Path, logs: Path):
        logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs = logs
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for role, extra in (("buffer", []), ("generator", ["--index", "0"])):
            with (logs / f"{role}.log").open("w") as log:
                self.procs[role] = subprocess.Popen(
                    [sys.executable, "-m", "asyncrl", role, "--config", str(config_path),
                     *extra], stdout=log, stderr=subprocess.STDOUT, env=env,
                    start_new_session=True)

    def check(self) -> None:
        for role, p in self.procs.items():
            if p.poll() is not None:
                tail = (self.logs / f"{role}.log").read_text().splitlines()[-15:]
                raise RuntimeError(f"the {role} exited with code {p.returncode}; last lines of "
                                   f"{self.logs / f'{role}.log'}:\n" + "\n".join(tail))

    def stop(self, grace_s: float = 10.0) -> None:
        """The generator exits by itself after `shutdown`; give it grace_s, then stop both
        process groups (SIGTERM, then SIGKILL)."""
        from asyncrl.launcher import signal_group

        deadline = time.monotonic() + grace_s
        gen = self.procs["generator"]
        while gen.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        for p in self.procs.values():
            signal_group(p, signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                signal_group(p, signal.SIGKILL)
                p.wait(5)


def mode_config(args, model_path: str, mode: str, run_dir: Path):
    from asyncrl.config import load_config, save_config
    from asyncrl.transport import make_keys

    cfg = load_config(args.config, [
        *args.overrides, *MODES[mode], *BENCH_SETTINGS, f"model.path={model_path}",
        f"net.base_port={common.free_base_port(1, 1)}", f"run_dir={run_dir}"])
    make_keys(run_dir / "keys")
    save_config(cfg, run_dir / "config.yaml")
    return cfg


def run_mode(args, model, model_path: str, mode: str, rep: int) -> Result:
    run_dir = Path(tempfile.mkdtemp(prefix=f"asyncrl-bench-streaming-{mode}-"))
    cfg = mode_config(args, model_path, mode, run_dir)
    print(f"[bench] round {rep + 1}, {mode}: base port {cfg.net.base_port}, {run_dir}",
          flush=True)
    roles = Roles(run_dir / "config.yaml", run_dir / "logs")
    ok = False
    try:
        result = _measure(args, cfg, mode, model, roles, run_dir)
        ok = True
        return result
    finally:
        roles.stop()  # whatever failed before: no role outlives its mode
        if ok and not args.keep_runs:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            print(f"[bench] {mode}: run directory kept: {run_dir}", flush=True)


def _measure(args, cfg, mode: str, model, roles: Roles, run_dir: Path) -> Result:
    from asyncrl import transport
    from asyncrl.sync.sender import WeightSender

    ctx = transport.context()
    keys = transport.keys_for(cfg.net, cfg.run_dir, "learner")
    server = transport.Server(ctx, cfg.net.bind_host, cfg.net.sync_control_port, keys)
    buffer = transport.Client(ctx, cfg.net.buffer_host, cfg.net.buffer_learner_port,
                              "bench-learner", keys)
    scraper = Scraper(cfg.net.generator_metrics_port(0), roles.procs["generator"].pid)
    scraper.start()
    sender = None
    try:
        sender = WeightSender(server, cfg.net.bind_host, cfg.net.sync_store_port, 1,
                              cfg.weight_sync.backend, cfg.weight_sync.timeout_s,
                              cfg.net.ready_timeout_s,
                              dtype=cfg.model.dtype)
        _start_sender(sender, roles, run_dir)
        return _consume(args, cfg, mode, model, sender, buffer, scraper, roles)
    finally:
        scraper.stop()
        if sender is not None:
            sender.shutdown("benchmark over")
        buffer.close()
        server.close()


def _start_sender(sender, roles: Roles, run_dir: Path) -> None:
    """Form the first session. The generator says hello right after recording its first sync
    probe (RUN_DIR/sync_probe.jsonl), so wait for that file while watching that both roles stay
    alive: WeightSender.start alone would wait net.ready_timeout_s for a generator that died."""
    deadline = time.monotonic() + FIRST_BATCH_TIMEOUT_S
    while not (run_dir / "sync_probe.jsonl").exists():
        roles.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"the generator did not start within {FIRST_BATCH_TIMEOUT_S:.0f} s")
        time.sleep(0.2)
    sender.start()


def _consume(args, cfg, mode: str, model, sender, buffer, scraper: Scraper, roles: Roles
             ) -> Result:
    """The stand-in learner: take batches as fast as they come, push after every K, until
    --seconds after the first batch."""
    from asyncrl import wire

    version = taken = 0
    t_open = None
    consumed: list[tuple[float, int]] = []
    by_call: dict[int, list[int]] = {}  # message seq -> completion lengths (batch: one call)
    push_s: list[float] = []
    deadline = time.monotonic() + FIRST_BATCH_TIMEOUT_S
    while t_open is None or time.monotonic() < t_open + args.seconds:
        req = wire.encode("batch_request", version, rank=0,
                          num_groups=cfg.learner.groups_per_step)
        reply = buffer.request(req, timeout_s=5.0)
        roles.check()
        if reply is None:
            continue
        msg = wire.decode(reply, expect=("batch",))
        if msg.status != "ok":
            if t_open is None and time.monotonic() > deadline:
                raise TimeoutError(f"no batch within {FIRST_BATCH_TIMEOUT_S:.0f} s")
            time.sleep(0.02)
            continue
        now = time.monotonic()
        taken += 1
        for g in msg.groups:
            by_call.setdefault(g.seq, []).extend(len(c.tokens) for c in g.completions)
        if t_open is None:
            t_open = now  # warm-up over: the engine is up and the pipeline full
        else:
            consumed.append((now, sum(len(g.completions) for g in msg.groups)))
        if taken % args.push_every == 0:
            version += 1
            pushed = sender.sync(model, version, due=True)
            if pushed is not None:
                push_s.append(pushed[0])
    per_call = cfg.generator.prompts_per_call * cfg.generator.group_size
    calls = [ls for ls in by_call.values() if len(ls) == per_call]
    lengths = [x for ls in by_call.values() for x in ls]
    return summarise(mode, list(scraper.scrapes), t_open, t_open + args.seconds, consumed,
                     calls, lengths, push_s)


# ------------------------------------------------------------------ report


def report(results: dict[str, list[Result]], args, cfg) -> tuple[dict, dict]:
    gc = cfg.generator
    keys = [k for k in Result.__dataclass_fields__ if k not in ("mode", "lengths")]
    med = {m: {k: statistics.median(getattr(r, k) for r in rs) for k in keys}
           for m, rs in results.items()}
    base = med.get("batch", {}).get("samples_per_s")
    rows = [[m, f"{f['samples_per_s']:.2f}", f"{f['tokens_per_s']:,.0f}",
             f"{f['consumed_per_s']:.2f}", f"{f['engine_busy']:.0%}",
             f"{f['generator_cpu']:.0%}", f"{f['tokens_per_busy_s']:,.0f}",
             f"{f['running']:.1f}", f"{f['delivery_s']:.1f}", f"{f['inflight_updates']:.0f}",
             f"{f['pushes']:.0f}", f"{f['push_s']:.2f}", f"{f['busy_retries']:.0f}",
             f"{f['samples_per_s'] / base:.2f}" if base else "-"] for m, f in med.items()]
    print(common.table(["mode", "samples/s", "tokens/s", "consumed/s", "engine busy",
                        "gen CPU", "tok/busy-s", "running", "first tok->buffer s",
                        "in-flight upd", "pushes", "push s", "busy", "x batch"], rows))
    lengths = [x for rs in results.values() for r in rs for x in r.lengths]
    print(f"completion lengths consumed (all modes): p10 {percentile(lengths, 0.1):.0f}, "
          f"p50 {percentile(lengths, 0.5):.0f}, p90 {percentile(lengths, 0.9):.0f}, max "
          f"{max(lengths, default=0)} tokens (max_tokens {gc.max_tokens}); "
          f"{sum(x >= gc.max_tokens for x in lengths) / max(len(lengths), 1):.1%} truncated")
    print(f"batch: {gc.prompts_per_call} prompts x {gc.group_size} per generate call; "
          f"streaming: up to {gc.max_inflight} sequences, send window {gc.send_window}; "
          f"{cfg.learner.groups_per_step} groups per batch, a push after every "
          f"{args.push_every}; {args.seconds:.0f} s after the first batch per mode, "
          f"{args.reps} round(s), medians; window (s): "
          + ", ".join(f"{m} {f['window_s']:.0f}" for m, f in med.items())
          + "; target: streaming >= 1.5 x batch samples/s")
    ratios = {f"streaming_{m}_vs_batch_samples_per_s": med[m]["samples_per_s"] / base
              for m in ("keep", "abort", "drain") if m in med and base}
    figures = {"config": args.config, "overrides": args.overrides, "seconds": args.seconds,
               "push_every": args.push_every, "reps": args.reps, "median": med,
               "length_percentiles": {q: percentile(lengths, q / 100) for q in (10, 50, 90)},
               "runs": {m: [{k: v for k, v in asdict(r).items() if k != "lengths"} for r in rs]
                        for m, rs in results.items()}}
    return figures, ratios


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    modes = args.modes.split(",")
    if unknown := [m for m in modes if m not in MODES]:
        raise SystemExit(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
    import torch

    from asyncrl.config import load_config
    from asyncrl.learner.model import load_policy
    from asyncrl.runner import resolve_model

    torch.set_num_threads(1)  # the engine has the other core
    print(f"# streaming vs batch generation  ({common.machine()})", flush=True)
    cfg = resolve_model(load_config(args.config, args.overrides))  # built once, cached
    model, _ = load_policy(cfg.model.path, cfg.model.dtype)
    results: dict[str, list[Result]] = {m: [] for m in modes}
    for rep in range(args.reps):
        for mode in modes[rep % len(modes):] + modes[: rep % len(modes)]:
            r = run_mode(args, model, cfg.model.path, mode, rep)
            print(f"[bench] {mode}: {r.samples_per_s:.2f} samples/s, {r.tokens_per_s:,.0f} "
                  f"tokens/s, engine busy {r.engine_busy:.0%}, {r.pushes} pushes, window "
                  f"{r.window_s:.0f} s", flush=True)
            results[mode].append(r)
    print(f"\n# streaming vs batch generation, {args.config} {' '.join(args.overrides)}  "
          f"({common.machine()})")
    figures, ratios = report(results, args, cfg)
    common.write_json(args.json, figures, ratios)


if __name__ == "__main__":
    main()
