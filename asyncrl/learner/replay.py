"""`asyncrl replay RUN_DIR`: re-run a finished run's learner alone on the batches it logged.

The async run's nondeterminism is all in which trajectories reached which batch; the learner
logged exactly that (RUN_DIR/batches/rank0.bin), so training on the same batches in the same
order, with the same seed, threads and schedule, gives the same weights on the same machine.
The checksum is compared with RUN_DIR/summary.json, and each step's loss with metrics.jsonl: a
run whose learner was killed and resumed from a checkpoint must match this uninterrupted
re-run exactly. Single-rank runs only (learner.nproc=1).
"""

from __future__ import annotations

import json
import time
from math import inf
from pathlib import Path

import torch

from asyncrl.config import load_config
from asyncrl.jsonl import read_jsonl
from asyncrl.learner.batch import collate
from asyncrl.learner.main import _build_models, build_policy
from asyncrl.learner.runlog import read_batch_log, weights_sha256
from asyncrl.learner.step import train_step, warmup_schedule


def replay(run_dir: Path, out=print) -> bool:
    """True when the replayed weights equal the run's (same SHA-256)."""
    cfg = load_config(run_dir / "config.yaml")
    if cfg.learner_world != 1:
        raise ValueError(f"{run_dir} was trained on {cfg.learner_world} ranks; replay "
                         "supports single-rank runs (learner.nproc=1)")
    log = run_dir / "batches" / "rank0.bin"
    summary = run_dir / "summary.json"
    if not log.is_file() or not summary.is_file():
        raise FileNotFoundError(f"{run_dir} has no finished run to replay ({log.name} and "
                                f"{summary.name} are written by the learner)")
    torch.set_num_threads(cfg.learner.threads)
    torch.manual_seed(cfg.learner.seed)
    model, tok = build_policy(cfg, cfg.model.path, cfg.model.dtype)
    model.train()
    models = _build_models(cfg, model, torch.device("cpu"), world=1)
    sched = warmup_schedule(models.policy_opt, cfg.learner.warmup_steps,
                            cfg.learner.total_steps if cfg.learner.lr_anneal else 0)
    logged_loss = {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")
                   if r["step"] > 0}
    t0 = time.time()
    steps = 0
    loss_diff = 0.0
    for steps, groups in enumerate(read_batch_log(log), 1):
        stats = train_step(models, collate(groups, tok.pad_token_id), cfg.learner,
                           cfg.generator.temperature, cfg.max_completion_tokens)
        sched.step()
        logged = logged_loss.get(steps)
        loss_diff = max(loss_diff, abs(stats["loss"] - logged) if logged is not None else inf)
        if steps % 25 == 0:
            out(f"[replay] step {steps} ({time.time() - t0:.0f}s)")
    got = weights_sha256(model)
    want = json.loads(summary.read_text())["final_weights_sha256"]
    same = got == want and loss_diff == 0.0 and steps == len(logged_loss)
    out(f"[replay] {steps} steps ({len(logged_loss)} in metrics.jsonl), largest loss difference "
        f"{loss_diff:.3g}; weights sha256 {got[:16]}... {'==' if got == want else '!='} run's "
        f"{want[:16]}...")
    return same
