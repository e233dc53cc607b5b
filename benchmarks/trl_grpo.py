"""asyncrl against TRL's GRPOTrainer: samples/s and time to a held-out accuracy
(docs/performance.md section 5).

Both sides train the same model on the same task with the same algorithm, from one config
(configs/default.yaml plus any key=value overrides), one after the other:
- asyncrl: a whole run started by `asyncrl run`'s own code path (`asyncrl.runner.execute_run`): one
  vLLM generator (one thread), the buffer, one torchrun learner rank (one thread), weights pushed
  over gloo after every step. Run dirs under --out.
- TRL: `trl.GRPOTrainer` in one process (transformers `generate` for sampling, no vLLM), run by
  this same file with --trl-side in the TRL venv (--trl-python), --trl-threads torch threads
  (default 2: the whole machine, as asyncrl's two processes use it).
Model: the embedded default's tiny Llama after its SFT warm start, built and cached by asyncrl's
own `asyncrl.task.tiny_model.prepare_builtin` (what `asyncrl run` and `asyncrl prepare` use) and
loaded on the TRL side by `asyncrl.learner.model.load_policy` (float32, eager attention). Prompts:
the config's training problems, BOS + text (token for token what `asyncrl.task.encode_prompt`
gives). Reward: `asyncrl.rewards.combine(task.rewards)` (the generator's rule-based rewards).
Evaluation: `asyncrl.learner.model.greedy_accuracy` on the held-out set with the task's
eval_reward, at step 0 and every learner.eval_interval steps, on both sides.

How the config maps onto GRPOConfig (the TRL side refuses a config it cannot map):
  generator.group_size -> num_generations; learner.groups_per_step x group_size ->
  per_device_train_batch_size (TRL counts completions, not prompts), gradient_accumulation_steps
  1, so one generation batch per optimizer step; generator.max_tokens -> max_completion_length;
  temperature -> temperature, top_p 1, top_k 0 (vLLM's defaults); the optimizer and schedule
  are asyncrl's own, passed in (AdamW(lr, weight_decay) and `asyncrl.learner.step.
  warmup_schedule`: HF's constant_with_warmup would give the first step lr 0, one step behind);
  max_grad_norm; clip_low -> epsilon, clip_high -> epsilon_high; advantage=grpo ->
  scale_rewards="group"; loss_agg=token_mean -> loss_type="dapo" (sum over the batch's tokens /
  its token count); kl_coef=0 -> beta=0 (no reference model); ppo_epochs=minibatches=1 ->
  num_iterations=1; float32, no gradient checkpointing, no checkpoints saved.

Reported: for each run, steps, trained samples (completions) per second over the whole run and
at the median step time (steps 2..N; robust to bursts of load from other jobs on a shared
machine), TRL's share of time in `generate`, held-out accuracy at step 0, at the end and the
best, and the step and time at which --target accuracy was first seen, with and without the
evaluations before it. TRL's evaluations are timed directly; asyncrl's are estimated from its
metrics.jsonl as benchmarks/async_vs_sync.py does (the gap between two rows minus the next
step's step_s and sync_s, less the median of that gap after steps without an evaluation). Time
counts from the first step's start: asyncrl's elapsed_s starts once the generator has joined the
weight-sync group, TRL's at on_train_begin; start-up is shown apart.

Setup, once (a separate venv: TRL is not a dependency of asyncrl; no vLLM there; torch==2.13.0
is the local CPU wheel, never an unpinned torch, which would download a CUDA build):
    python3.11 -m venv /work/trl-venv
    /work/trl-venv/bin/pip install torch==2.13.0
    /work/trl-venv/bin/pip install trl==1.16.0 transformers==5.19.0 omegaconf numpy \\
        safetensors tokenizers math-verify==0.9.0 pyzmq msgpack prometheus-client matplotlib
    /work/trl-venv/bin/pip install -e . --no-deps
(`.venv/bin/python -m benchmarks.trl_grpo --setup` runs exactly these.)

Run from the repository root (about 3 min per asyncrl/TRL pair, 8-9 min with the defaults, on
2 cores):
    .venv/bin/python -m benchmarks.trl_grpo [--repeats 3] [--steps 80] [--target 0.75] [key=value]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

from benchmarks import common
from benchmarks.common import free_base_port

ROOT = Path(__file__).resolve().parents[1]
TRL_VENV = Path("/work/trl-venv")
SETUP = [
    ["python3.11", "-m", "venv", "{venv}"],
    ["{venv}/bin/pip", "install", "torch==2.13.0"],
    ["{venv}/bin/pip", "install", "trl==1.16.0", "transformers==5.19.0", "omegaconf", "numpy",
     "safetensors", "tokenizers", "math-verify==0.9.0", "pyzmq", "msgpack", "prometheus-client",
     "matplotlib"],
    ["{venv}/bin/pip", "install", "-e", str(ROOT), "--no-deps"],
]


def _parser() -> argparse.ArgumentParser:
    p = common.doc_parser(__doc__)
    common.add_run_arguments(p)
    p.add_argument("--steps", type=int, default=80,
                   help="optimizer steps of every run (learner.total_steps; TRL max_steps)")
    p.add_argument("--eval-interval", type=int, default=10, help="learner.eval_interval")
    p.add_argument("--repeats", type=int, default=3,
                   help="asyncrl/TRL pairs, alternating which side goes first")
    p.add_argument("--seed", type=int, default=0,
                   help="pair k uses seed --seed + k (learner.seed and generator.seed)")
    p.add_argument("--sides", default="asyncrl,trl", help="comma-separated: asyncrl, trl")
    p.add_argument("--trl-python", default=str(TRL_VENV / "bin" / "python"),
                   help="the TRL venv's interpreter")
    p.add_argument("--trl-threads", type=int, default=2, help="torch threads of the TRL process")
    p.add_argument("--out", default="/tmp/asyncrl-bench-item5")
    p.add_argument("--json", metavar="PATH", help="write the figures and ratios here")
    p.add_argument("--setup", action="store_true",
                   help=f"create the TRL venv at {TRL_VENV} (the commands above) and exit")
    p.add_argument("--trl-side", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--metrics", help=argparse.SUPPRESS)
    return p


# ------------------------------------------------------------------ TRL side (TRL venv)


def grpo_config_kwargs(cfg, steps: int, out_dir: str) -> dict:
    """GRPOConfig arguments equivalent to the asyncrl config (see the module docstring)."""
    lc, gc = cfg.learner, cfg.generator
    unmappable = [f"{k}={getattr(lc, k)!r} (need {v!r})" for k, v in
                  (("advantage", "grpo"), ("loss_agg", "token_mean"), ("offpolicy", "none"),
                   ("kl_coef", 0.0), ("entropy_coef", 0.0), ("ppo_epochs", 1),
                   ("minibatches", 1), ("dynamic_sampling", False), ("overlong_filter", False),
                   ("overlong_cache", 0), ("clip_c", 0.0), ("nproc", 1))
                  if getattr(lc, k) != v]
    if unmappable:
        raise SystemExit("the TRL side cannot mirror learner." + ", learner.".join(unmappable))
    return dict(
        output_dir=out_dir, max_steps=steps, seed=lc.seed, data_seed=lc.seed,
        num_generations=gc.group_size, per_device_train_batch_size=lc.groups_per_step
        * gc.group_size, gradient_accumulation_steps=1, max_completion_length=gc.max_tokens,
        temperature=gc.temperature, top_p=1.0, top_k=0, learning_rate=lc.lr,
        weight_decay=lc.weight_decay, max_grad_norm=lc.max_grad_norm, beta=0.0,
        epsilon=lc.clip_low, epsilon_high=lc.clip_high, num_iterations=1,
        scale_rewards="group", loss_type="dapo", use_vllm=False, use_cpu=True, bf16=False,
        fp16=False, gradient_checkpointing=False, save_strategy="no", report_to="none",
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)


def trl_side(args) -> None:
    """One GRPOTrainer run; one metrics.jsonl row per step (evaluated rows carry accuracy)."""
    t_proc = time.time()
    import torch

    torch.set_num_threads(args.trl_threads)
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from asyncrl.config import load_config
    from asyncrl.learner.model import greedy_accuracy, load_policy
    from asyncrl.learner.step import warmup_schedule
    from asyncrl.rewards import REWARD_FUNCTIONS, combine
    from asyncrl.task import encode_prompt, load_task

    cfg = load_config(args.config, args.overrides)
    model, tok = load_policy(args.model, cfg.model.dtype)
    train, held_out = load_task(cfg.task)
    prompts = [tok.bos_token + p.prompt for p in train]
    assert tok(text=prompts[:1])["input_ids"][0] == encode_prompt(tok, train[0].prompt)
    data = Dataset.from_dict({"prompt": prompts, "answer": [p.answer for p in train]})
    score = combine(cfg.task.rewards)
    eval_reward = REWARD_FUNCTIONS[cfg.task.eval_reward]
    batch = cfg.learner.groups_per_step * cfg.generator.group_size
    metrics = Path(args.metrics)

    def reward(completions: list[str], answer: list[str], **_) -> list[float]:
        return [score(c, a) for c, a in zip(completions, answer, strict=True)]

    class Recorder(TrainerCallback):
        """Writes rows like asyncrl's metrics.jsonl; evaluation time is kept apart."""

        def __init__(self) -> None:
            self.t0 = 0.0
            self.eval_total = 0.0
            self.pending: dict | None = None

        def _evaluate(self) -> tuple[float, float]:
            t = time.perf_counter()
            acc = greedy_accuracy(model, tok, held_out, cfg.generator.max_tokens, eval_reward,
                                  cfg.task.chat_template)
            return acc, time.perf_counter() - t

        def _write(self, row: dict) -> None:
            with metrics.open("a") as f:
                f.write(json.dumps(row) + "\n")

        def on_train_begin(self, targs, state, control, **kw):
            self.t0 = time.perf_counter()
            acc, secs = self._evaluate()
            self.eval_total += secs
            self._write({"step": 0, "elapsed_s": 0.0, "train_s": 0.0, "samples_trained": 0,
                         "eval_accuracy": acc, "eval_s": secs, "eval_before_s": 0.0,
                         "startup_s": time.time() - t_proc, "threads": torch.get_num_threads()})

        def on_step_end(self, targs, state, control, **kw):
            step = state.global_step
            elapsed = time.perf_counter() - self.t0  # includes every evaluation before this
            row = {"step": step, "elapsed_s": elapsed, "train_s": elapsed - self.eval_total,
                   "eval_before_s": self.eval_total, "samples_trained": step * batch,
                   "generate_s": gen_timer.total}
            if step % cfg.learner.eval_interval == 0 or step == args.steps:
                row["eval_accuracy"], row["eval_s"] = self._evaluate()
                self.eval_total += row["eval_s"]
            self.pending = row

        def on_log(self, targs, state, control, logs=None, **kw):
            if self.pending is not None and logs and "reward" in logs:
                self._write({**self.pending, "reward_mean": logs["reward"]})
                self.pending = None

        def on_train_end(self, targs, state, control, **kw):
            if self.pending is not None:
                self._write(self.pending)

    gen_timer = _Timer()
    model.generate = gen_timer.wrap(model.generate)  # counts sampling, not eval's greedy calls
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learner.lr,
                            weight_decay=cfg.learner.weight_decay)  # as the learner builds it
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward, processing_class=tok, train_dataset=data,
        args=GRPOConfig(**grpo_config_kwargs(cfg, args.steps, str(metrics.parent / "trl-out"))),
        callbacks=[Recorder()], optimizers=(opt, warmup_schedule(opt, cfg.learner.warmup_steps)))
    trainer.train()


class _Timer:
    """Seconds spent in a wrapped callable, excluding calls made during evaluation."""

    def __init__(self) -> None:
        self.total = 0.0

    def wrap(self, fn):
        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                if kw.get("do_sample", True) is not False:  # greedy_accuracy passes False
                    self.total += time.perf_counter() - t
        return timed


# ------------------------------------------------------------------ driver (asyncrl venv)


def asyncrl_eval_seconds(rows: list[dict]) -> dict[int, float]:
    """Estimated seconds of each evaluation (by step), from asyncrl's metrics.jsonl rows.

    A row's elapsed_s is taken before that step's evaluation, so the evaluation falls in the gap
    to the next row, together with the next step's step_s and sync_s and some bookkeeping."""
    gaps = {}
    for prev, nxt in zip(rows, rows[1:]):
        gaps[prev["step"]] = (nxt["elapsed_s"] - prev["elapsed_s"] - nxt["step_s"]
                              - (nxt["sync_s"] or 0.0))
    evaluated = {r["step"] for r in rows if "eval_accuracy" in r}
    plain = [g for s, g in gaps.items() if s not in evaluated] or [0.0]
    base = statistics.median(plain)
    return {s: max(0.0, g - base) for s, g in gaps.items() if s in evaluated}


def summarise(side: str, rows: list[dict], target: float, wall_s: float) -> dict:
    """Figures of one run; times exclude evaluations (as measured or estimated) unless noted."""
    if side == "asyncrl":
        evals = asyncrl_eval_seconds(rows)
        for r in rows:
            r["eval_before_s"] = sum(s for k, s in evals.items() if k < r["step"])
            r["train_s"] = r["elapsed_s"] - r["eval_before_s"]
    last = rows[-1]
    accs = [(r["step"], r["eval_accuracy"], r) for r in rows if "eval_accuracy" in r]
    # Step 1 carries warm-up; the median ignores bursts of load from other jobs.
    step_s = statistics.median(b["train_s"] - a["train_s"] for a, b in zip(rows[1:], rows[2:]))
    hit = next((r for _, a, r in accs if a >= target), None)
    return {
        "side": side, "steps": last["step"], "train_s": last["train_s"],
        "samples_per_s": last["samples_trained"] / last["train_s"],
        "steps_per_s": last["step"] / last["train_s"], "median_step_s": step_s,
        "samples_per_s_median": last["samples_trained"] / last["step"] / step_s,
        "acc0": accs[0][1],
        "acc_final": accs[-1][1], "acc_best": max(a for _, a, _ in accs),
        "hit_step": hit["step"] if hit else None,
        "hit_s": hit["train_s"] if hit else None,
        "hit_s_with_eval": hit["elapsed_s"] if hit else None,
        "startup_s": wall_s - last["elapsed_s"], "wall_s": wall_s,
        "generate_share": (last["generate_s"] / last["train_s"]) if "generate_s" in last
        else None,
    }


def run_asyncrl(args, run_dir: Path, seed: int) -> tuple[list[dict], float]:
    from asyncrl.config import load_config
    from asyncrl.runner import execute_run

    cfg = load_config(args.config, [
        *args.overrides, f"learner.seed={seed}", f"generator.seed={seed}",
        f"learner.total_steps={args.steps}",
        f"learner.eval_interval={args.eval_interval}", f"net.base_port={free_base_port()}",
        f"run_dir={run_dir}"])
    t = time.perf_counter()
    code = execute_run(cfg, out=lambda line: print(f"  {line}", flush=True))
    wall = time.perf_counter() - t
    if code != 0:
        raise RuntimeError(f"asyncrl run {run_dir} failed with exit code {code}; see its logs/")
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()], wall


def run_trl(args, run_dir: Path, model_dir: str, seed: int) -> tuple[list[dict], float]:
    run_dir.mkdir(parents=True)
    cmd = [args.trl_python, "-m", "benchmarks.trl_grpo", "--trl-side", "--model", model_dir,
           "--metrics", str(run_dir / "metrics.jsonl"), "--config", args.config,
           "--steps", str(args.steps), "--trl-threads", str(args.trl_threads),
           *args.overrides, f"learner.seed={seed}", f"learner.eval_interval={args.eval_interval}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.trl_threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    t = time.perf_counter()
    with (run_dir / "trl.log").open("w") as log:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t
    if code != 0:
        raise RuntimeError(f"TRL run failed with exit code {code}; see {run_dir / 'trl.log'}")
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()], wall


def setup(venv: Path) -> None:
    for cmd in SETUP:
        cmd = [c.format(venv=venv) for c in cmd]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.trl_side:
        return trl_side(args)
    if args.setup:
        return setup(Path(args.trl_python).parents[1])
    from asyncrl.config import load_config
    from asyncrl.runner import resolve_model
    from benchmarks.common import machine

    title = f"# asyncrl vs TRL GRPOTrainer, time to {args.target:.0%} held-out accuracy"
    print(f"{title}  ({machine()})", flush=True)
    model_dir = resolve_model(load_config(args.config, args.overrides)).model.path
    out_dir = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    sides = args.sides.split(",")
    results = []
    for i in range(args.repeats):
        seed = args.seed + i
        for side in (sides if i % 2 == 0 else sides[::-1]):
            run_dir = out_dir / f"{len(results) + 1}-{side}-seed{seed}"
            print(f"[bench] run {len(results) + 1}: {side}, seed {seed}, {run_dir}", flush=True)
            rows, wall = (run_asyncrl(args, run_dir, seed) if side == "asyncrl"
                          else run_trl(args, run_dir, model_dir, seed))
            results.append({**summarise(side, rows, args.target, wall), "seed": seed,
                            "load": os.getloadavg()[0]})
            print(f"[bench] {_line(results[-1])}", flush=True)
    print(f"\n{title}  ({machine()})")
    print(f"{args.config} {' '.join(args.overrides)}, {args.steps} steps, eval every "
          f"{args.eval_interval}, TRL with {args.trl_threads} threads; model {model_dir}; "
          f"run dirs in {out_dir}")
    report(results, args.target, args.json)


def _line(r: dict) -> str:
    hit = (f"target at step {r['hit_step']}, {r['hit_s']:.1f} s "
           f"({r['hit_s_with_eval']:.1f} s with eval)" if r["hit_step"] is not None
           else "target not reached")
    return (f"{r['side']}: {r['samples_per_s']:.1f} samples/s, accuracy {r['acc0']:.3f} -> "
            f"{r['acc_final']:.3f}, {hit}")


def report(results: list[dict], target: float, json_path: str | None = None) -> None:
    from benchmarks.common import table, write_json

    rows = []
    for n, r in enumerate(results, 1):
        rows.append([n, r["side"], r["seed"], r["steps"], f"{r['train_s']:.1f}",
                     f"{r['samples_per_s']:.1f}", f"{r['median_step_s']:.3f}",
                     f"{r['samples_per_s_median']:.1f}",
                     "-" if r["generate_share"] is None else f"{r['generate_share']:.0%}",
                     f"{r['acc0']:.3f}", f"{r['acc_final']:.3f}", f"{r['acc_best']:.3f}",
                     *([r["hit_step"], f"{r['hit_s']:.1f}", f"{r['hit_s_with_eval']:.1f}"]
                       if r["hit_step"] is not None else ["-", "not reached", "-"]),
                     f"{r['startup_s']:.0f}", f"{r['load']:.1f}"])
    print(f"\ntimes in s from the first step, without evaluations unless noted; target "
          f"{target:.0%}; median step s: the median time of steps 2..N (robust to bursts of load "
          "from other jobs); load after: 1-minute load average when the run ended")
    print(table(["run", "side", "seed", "steps", "train s", "samples/s", "median step s",
                 "samples/s at median", "sampling share",
                 "acc step 0", "acc final", "acc best", "step at target", "time to target",
                 "with eval", "start-up + end s", "load after"], rows))
    med = {}
    for side in ("asyncrl", "trl"):
        mine = [r for r in results if r["side"] == side]
        if not mine:
            continue
        hits = [r["hit_s"] for r in mine if r["hit_s"] is not None]
        paced = [r["hit_step"] * r["median_step_s"] for r in mine if r["hit_s"] is not None]
        med[side] = (statistics.median(r["samples_per_s"] for r in mine),
                     statistics.median(hits) if hits else None,
                     statistics.median(r["samples_per_s_median"] for r in mine),
                     statistics.median(paced) if paced else None)
        print(f"{side:>8}: median {med[side][0]:.1f} samples/s ({med[side][2]:.1f} at the median "
              "step); time to target "
              + (f"median {med[side][1]:.1f} s of {', '.join(f'{h:.1f}' for h in hits)} "
                 f"(steps x median step: {med[side][3]:.1f} s)" if hits else "not reached")
              + (f" ({len(mine) - len(hits)} of {len(mine)} runs did not reach it)"
                 if hits and len(hits) < len(mine) else ""))
    ratios = {}
    if len(med) == 2:
        ratios["asyncrl_over_trl_samples_per_s"] = med["asyncrl"][0] / med["trl"][0]
        print(f"   ratio: samples/s asyncrl / TRL {med['asyncrl'][0] / med['trl'][0]:.2f}x "
              f"({med['asyncrl'][2] / med['trl'][2]:.2f}x at the median step)", end="")
        if med["asyncrl"][1] and med["trl"][1]:
            ratio = med["trl"][1] / med["asyncrl"][1]
            paced = med["trl"][3] / med["asyncrl"][3]
            ratios["trl_over_asyncrl_time_to_target"] = ratio
            print(f"; time to target TRL / asyncrl {ratio:.2f}x ({paced:.2f}x at the median step;"
                  f" target >= 2x: {'met' if ratio >= 2 else 'not met'})")
        else:
            print()
    write_json(json_path, {"target": target, "runs": results}, ratios)


if __name__ == "__main__":
    main()
