"""LoRA (model.lora) against full fine-tuning, side by side in one run: push bytes and time,
the learner's memory, generation tokens/s (docs/performance.md, "LoRA").

For each model (--models):
  smollm2  the real SmolLM2-135M-Instruct (builtin:smollm2-135m-instruct, 134.5M parameters,
           float32), built in ~/.cache/asyncrl like a run's
  0.5b     the Qwen2-0.5B shape with random weights (494M parameters, float32; the tiny
           byte-level tokenizer, no text is decoded), built once under --work-dir
with adapters of --rank (alpha 2 x rank) on every linear layer of the decoder blocks
(model.lora's default target modules).

push: two generator processes, each with the real engine (asyncrl.generator.engine.VLLMEngine,
in-process, float32, one thread): one without LoRA, one with LoRA enabled. The learner (this
process) holds the adapted model and joins each in a weight-sync group (gloo), then pushes
through the real transfers (asyncrl/sync/transfer.py: Broadcast of the base weights, whose
engine reloads them in place; Adapter of the adapter tensors, whose engine writes them to
/dev/shm and adds them as that version's LoRA). Time = from the announcement (here a pipe
message instead of the ZeroMQ control message) to the engine saying it has loaded; median of
--reps after one untimed push each.

memory: one learner per side in a fresh process, built as asyncrl.learner.main builds it
(load_policy, lora.apply for LoRA, _build_models: AdamW over what trains), one train_step
(GRPO) on 4 completions of --tokens tokens; then the bytes of the parameters, gradients and
AdamW moments, counted from the tensors, and the step's peak resident memory above the memory
before it (VmHWM, reset with /proc/self/clear_refs).

generate: --prompts prompts x --samples samples of --max-tokens tokens (ignore_eos, so every
completion is that long), temperature 1, on the engine without LoRA and on the LoRA engine
with the pushed adapter, one after the other; tokens/s = sampled tokens / wall seconds, the
median of --reps.

Ratios (--json): push_bytes_lora_over_full_<model>, push_seconds_lora_over_full_<model>,
learner_state_bytes_lora_over_full_<model>, learner_peak_lora_over_full_<model>,
gen_tokens_per_s_lora_over_off_<model>.

Run from the repository root (smollm2 ~3 min, 0.5b ~8 min on 2 cores):
    .venv/bin/python -m benchmarks.lora --json lora.json
    .venv/bin/python -m benchmarks.lora --models smollm2
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

from benchmarks import common

HOST = "127.0.0.1"
TIMEOUT_S = 600.0
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _parser():
    p = common.doc_parser(__doc__)
    p.add_argument("--models", default="smollm2,0.5b")
    p.add_argument("--parts", default="push,memory,generate")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64, help="tokens per completion (memory)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--work-dir", default="~/.cache/asyncrl/bench")
    common.add_json_argument(p)
    return p


def _model_dir(name: str, work_dir: Path) -> Path:
    from benchmarks.weight_sync import model_dir

    return model_dir({"smollm2": "smollm2", "0.5b": "0.5b"}[name], work_dir)


def _adapted(path: str, rank: int):
    """The learner's policy with adapters, B drawn small (a trained adapter, not the zero
    start), so that the adapter engine really computes the LoRA terms."""
    import torch

    from asyncrl import lora
    from asyncrl.learner.model import load_policy

    model, _ = load_policy(path)
    lora.apply(model, rank, 2.0 * rank, 0.0, TARGETS)
    torch.manual_seed(0)
    for m in lora.layers(model):
        torch.nn.init.normal_(m.lora_B.weight, std=1e-3)
    return model


# ------------------------------------------------------------------ generator (child process)


def generator(path: str, lora_rank: int, store_port: int, conn) -> None:
    """A real engine that joins the sync group as rank 1 and, on each ("push", ...) message,
    receives and loads a push; on ("generate", ...) samples and answers the tokens/s."""
    from asyncrl.generator.engine import VLLMEngine, configure_cpu_env

    configure_cpu_env(2, 1)
    config = json.loads((Path(path) / "config.json").read_text())
    engine = VLLMEngine(path, "float32", 0, 256, 0.85, lora_rank=lora_rank, max_loras=2,
                        adapter_dir=Path(tempfile.mkdtemp(prefix="asyncrl-bench-lora-",
                                                          dir="/dev/shm")) if lora_rank
                        else None)
    engine.init_sync(HOST, store_port, 1, 2, "gloo", TIMEOUT_S, "bench/lora")
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg[0] == "push":
            _, specs, adapter, version = msg
            extra = {"adapter": adapter, "version": version} if adapter else {}
            seconds, nbytes = engine.receive_weights(specs, [], 64 << 20, **extra)
            conn.send((seconds, nbytes))
        elif msg[0] == "generate":
            _, prompts, samples, max_tokens, reps = msg
            conn.send(_generate(engine, prompts, samples, max_tokens, reps,
                                config.get("eos_token_id")))
        else:
            return


def _generate(engine, prompts, samples, max_tokens, reps, eos) -> list[float]:
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(n=samples, temperature=1.0, max_tokens=max_tokens,
                            ignore_eos=True, detokenize=False, seed=0)
    lora = engine.adapters.request(None) if engine.adapters else None
    rates = []
    for _ in range(reps + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        outs = engine.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                                   use_tqdm=False, lora_request=lora)
        n = sum(len(c.token_ids) for o in outs for c in o.outputs)
        rates.append(n / (time.perf_counter() - t0))
    return rates[1:]


class _Engine:
    """A generator process and the learner's end of its sync group."""

    def __init__(self, path: str, lora_rank: int, ctx):
        from asyncrl.sync import group

        port = common.free_port()
        self.store = group.open_store(HOST, port, True, TIMEOUT_S)
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=generator, args=(path, lora_rank, port, child),
                                daemon=True)
        self.proc.start()
        self.pg = group.join(self.store, "bench/lora", 0, 2, "gloo", TIMEOUT_S, bind_host=HOST)
        if not self.conn.poll(TIMEOUT_S):
            raise TimeoutError("the generator did not start")
        assert self.conn.recv() == "ready"

    def push(self, named, adapter: dict | None, version: int) -> tuple[float, int]:
        from asyncrl.sync import transfer, weights

        specs = weights.specs_of(named)
        t = (transfer.Adapter("gloo", HOST, TIMEOUT_S, 64 << 20, adapter) if adapter
             else transfer.Broadcast("gloo", HOST, TIMEOUT_S, 64 << 20))
        t.pg = self.pg
        t0 = time.perf_counter()
        self.conn.send(("push", specs, adapter, version))
        t.send(specs, iter(named))
        self.conn.recv()
        return time.perf_counter() - t0, sum(t.numel() * t.element_size() for _, t in named)

    def generate(self, *args) -> list[float]:
        self.conn.send(("generate", *args))
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(("stop",))
        self.proc.join(30)


def part_push_generate(path: str, args, parts: set[str]) -> dict:
    from asyncrl import lora

    ctx = mp.get_context("spawn")
    model = _adapted(path, args.rank)
    adapter_named = lora.adapter_tensors(model.state_dict().items())
    adapter_named = [(n, t.detach()) for n, t in adapter_named]
    base_named = [(n, t.detach()) for n, t in model.state_dict().items()
                  if not lora.is_adapter_tensor(n)]
    adapter = {"r": args.rank, "lora_alpha": 2.0 * args.rank, "target_modules": TARGETS}
    out: dict = {}
    print("  starting the two engines (without and with LoRA) ...", flush=True)
    full_engine, lora_engine = _Engine(path, 0, ctx), _Engine(path, args.rank, ctx)
    try:
        full, ad = [], []
        for version in range(1, args.reps + 2):  # the first push of each is a warm-up
            full.append(full_engine.push(base_named, None, version))
            ad.append(lora_engine.push(adapter_named, adapter, version))
        out["push"] = {"full_bytes": full[0][1], "lora_bytes": ad[0][1],
                       "full_seconds": common.median([s for s, _ in full[1:]]),
                       "lora_seconds": common.median([s for s, _ in ad[1:]])}
        if "generate" in parts:
            import random

            rng = random.Random(0)
            prompts = [[rng.randrange(3, 250) for _ in range(16)] for _ in range(args.prompts)]
            gen = (prompts, args.samples, args.max_tokens, args.reps)
            off = full_engine.generate(*gen)
            on = lora_engine.generate(*gen)
            out["generate"] = {"off_tokens_per_s": common.median(off),
                               "lora_tokens_per_s": common.median(on), "off_runs": off,
                               "lora_runs": on}
    finally:
        full_engine.close()
        lora_engine.close()
    return out


# ------------------------------------------------------------------ learner memory


def _learner(path: str, rank: int, tokens: int, conn) -> None:
    import torch

    from asyncrl import lora, testing
    from asyncrl.config import RunConfig
    from asyncrl.learner.batch import collate
    from asyncrl.learner.main import _build_models
    from asyncrl.learner.model import load_policy
    from asyncrl.learner.step import train_step
    from benchmarks.learner_memory import peak, reset_peak

    torch.set_num_threads(2)
    cfg = RunConfig()
    cfg.model.path = path
    model, tok = load_policy(path)
    if rank:
        lora.apply(model, rank, 2.0 * rank, 0.0, TARGETS)
    model.train()
    models = _build_models(cfg, model, torch.device("cpu"), 1)
    vocab = model.get_input_embeddings().num_embeddings
    groups = testing.make_groups(1, 4, rng=0, vocab_size=min(vocab, 250), min_token=3,
                                 prompt_len=16, completion_len=(tokens, tokens),
                                 finish_reason="length")
    batch = collate(groups, tok.pad_token_id)
    before = reset_peak()
    t0 = time.perf_counter()
    train_step(models, batch, cfg.learner, 1.0, tokens)
    seconds = time.perf_counter() - t0
    step_peak = peak() - before

    def nbytes(ts):
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    params = list(model.parameters())
    opt = [v for st in models.policy_opt.state.values() for v in st.values()
           if torch.is_tensor(v) and v.dim() > 0]
    conn.send({"weights": nbytes(params), "gradients": nbytes(p.grad for p in params),
               "optimizer": nbytes(opt), "trainable_params": sum(p.numel() for p in params
                                                                 if p.requires_grad),
               "step_peak_bytes": step_peak, "step_seconds": seconds})


def part_memory(path: str, args) -> dict:
    ctx = mp.get_context("spawn")
    out = {}
    for side, rank in (("full", 0), ("lora", args.rank)):
        conn, child = ctx.Pipe()
        p = ctx.Process(target=_learner, args=(path, rank, args.tokens, child))
        p.start()
        out[side] = conn.recv()
        p.join()
        out[side]["state_bytes"] = sum(out[side][k] for k in ("weights", "gradients",
                                                               "optimizer"))
    return out


# ------------------------------------------------------------------ main


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MB"


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    parts = set(args.parts.split(","))
    work = Path(args.work_dir).expanduser()
    figures: dict = {"rank": args.rank, "target_modules": TARGETS}
    ratios: dict[str, float] = {}
    print(common.machine())
    for name in args.models.split(","):
        path = str(_model_dir(name, work))
        print(f"[{name}] {path}", flush=True)
        fig: dict = {}
        if parts & {"push", "generate"}:
            fig.update(part_push_generate(path, args, parts))
        if "memory" in parts:
            fig["memory"] = part_memory(path, args)
        figures[name] = fig
        rows = []
        if "push" in fig:
            p = fig["push"]
            ratios[f"push_bytes_lora_over_full_{name}"] = p["lora_bytes"] / p["full_bytes"]
            ratios[f"push_seconds_lora_over_full_{name}"] = p["lora_seconds"] / p["full_seconds"]
            rows += [["push bytes", _mb(p["full_bytes"]), _mb(p["lora_bytes"]),
                      f"{p['lora_bytes'] / p['full_bytes']:.4f}x"],
                     ["push seconds (announce -> loaded)", f"{p['full_seconds']:.3f}",
                      f"{p['lora_seconds']:.3f}", f"{p['lora_seconds'] / p['full_seconds']:.3f}x"]]
        if "memory" in fig:
            m = fig["memory"]
            ratios[f"learner_state_bytes_lora_over_full_{name}"] = (
                m["lora"]["state_bytes"] / m["full"]["state_bytes"])
            ratios[f"learner_peak_lora_over_full_{name}"] = (
                m["lora"]["step_peak_bytes"] / max(1, m["full"]["step_peak_bytes"]))
            for key in ("weights", "gradients", "optimizer", "state_bytes", "step_peak_bytes"):
                a, b = m["full"][key], m["lora"][key]
                rows.append([f"learner {key.replace('_bytes', '')}", _mb(a), _mb(b),
                             f"{b / max(a, 1):.4f}x"])
            rows.append(["learner step seconds", f"{m['full']['step_seconds']:.2f}",
                         f"{m['lora']['step_seconds']:.2f}",
                         f"{m['lora']['step_seconds'] / m['full']['step_seconds']:.2f}x"])
        if "generate" in fig:
            g = fig["generate"]
            ratios[f"gen_tokens_per_s_lora_over_off_{name}"] = (
                g["lora_tokens_per_s"] / g["off_tokens_per_s"])
            rows.append(["generation tokens/s", f"{g['off_tokens_per_s']:.1f}",
                         f"{g['lora_tokens_per_s']:.1f}",
                         f"{g['lora_tokens_per_s'] / g['off_tokens_per_s']:.3f}x"])
        print(common.table([f"{name} (rank {args.rank})", "full / LoRA off", "LoRA", "ratio"],
                           rows), flush=True)
    common.write_json(args.json, figures, ratios)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
