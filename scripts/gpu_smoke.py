"""The report of scripts/gpu-smoke.sh: did the GPU path work? One line per figure, then PASS/FAIL.

    python scripts/gpu_smoke.py RUN_DIR

Reads what the run left in RUN_DIR (config, metrics.jsonl, sync_probe.jsonl, the last
checkpoint, RUN_DIR/gen0_stats.json written by the generator at exit) and measures, on the same
GPUs, the floor for moving the same bytes: a raw NCCL broadcast between two GPUs, or with one
GPU (colocated, CUDA IPC) a device-to-device copy. Exit status 0 on PASS.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

PROBE_TOLERANCE = {"float32": 1e-4, "bfloat16": 0.1, "float16": 0.05}  # max |diff| of logprobs


def rows(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def probe_diff(run_dir: Path, cfg) -> tuple[int, float]:
    """Max |generator - learner| logprob on the probe prompt, at the newest checkpointed version
    the generator recorded."""
    import torch

    from asyncrl.learner.checkpoint import latest
    from asyncrl.learner.model import load_policy, token_logprobs

    ckpt = latest(run_dir)
    probes = {p["policy_version"]: p for p in rows(run_dir / "sync_probe.jsonl")}
    if ckpt is None or ckpt.step not in probes:
        return -1, float("inf")
    probe = probes[ckpt.step]
    model, _ = load_policy(ckpt.path, cfg.model.dtype)
    model.to("cuda").eval()
    ids = torch.tensor([probe["prompt_tokens"] + probe["tokens"]], device="cuda")
    with torch.no_grad():
        lp = token_logprobs(model, ids, torch.ones_like(ids), probe["temperature"])
    lp = lp[0, len(probe["prompt_tokens"]) - 1 :].float().cpu()
    return ckpt.step, (lp - torch.tensor(probe["logprobs"])).abs().max().item()


def raw_copy_seconds(nbytes: int, two_gpus: bool) -> tuple[str, float]:
    """The floor for moving nbytes: NCCL broadcast GPU0 -> GPU1, or a device-to-device copy."""
    import torch

    if not two_gpus:
        src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        times = []
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dst.copy_(src)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return "device copy", statistics.median(times)
    import torch.multiprocessing as mp

    port = 29500 + os.getpid() % 1000
    queue = mp.get_context("spawn").SimpleQueue()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_broadcast, args=(r, port, nbytes, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    return "raw NCCL broadcast", queue.get()


def _broadcast(rank: int, port: int, nbytes: int, queue) -> None:
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    buf = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dist.broadcast(buf, 0)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        queue.put(statistics.median(times[1:]))
    dist.destroy_process_group()


def main(run_dir: Path) -> int:
    from asyncrl.config import load_config

    cfg = load_config(run_dir / "config.yaml")
    metrics = rows(run_dir / "metrics.jsonl")
    steps = max((r["step"] for r in metrics), default=0)
    sync = [r["sync_s"] for r in metrics if r.get("sync_s")]
    summary = run_dir / "summary.json"
    stats_path = run_dir / "gen0_stats.json"  # written by the generator when it exits
    gen_stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    nbytes = int(gen_stats.get("sync_bytes_per_push", 0))
    version, diff = probe_diff(run_dir, cfg)
    tol = PROBE_TOLERANCE[cfg.model.dtype]
    two_gpus = cfg.weight_sync.backend == "nccl"
    floor_name, floor_s = raw_copy_seconds(nbytes, two_gpus) if nbytes else ("raw copy", 0.0)
    sync_s = statistics.median(sync) if sync else float("nan")
    print(f"devices: generators {cfg.generator.device_ids}, learner {cfg.learner.device_ids}, "
          f"sync over {cfg.weight_sync.backend}, weights {cfg.model.dtype}")
    print(f"steps: {steps}/{cfg.learner.total_steps} (summary.json "
          f"{'written' if summary.is_file() else 'MISSING'})")
    print(f"sync: {sync_s:.3f}s median per push of {nbytes / 1e6:.1f} MB vs {floor_name} "
          f"{floor_s:.4f}s ({sync_s / max(floor_s, 1e-9):.1f}x)")
    print(f"probe: max |diff| {diff:.2e} between vLLM and the learner at version {version} "
          f"(tolerance {tol:g} for {cfg.model.dtype})")
    print(f"generation: {gen_stats.get('tokens_per_s', float('nan')):.0f} tok/s")
    ok = (steps == cfg.learner.total_steps and summary.is_file() and diff <= tol
          and len(sync) > 0)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
