"""Learner memory per rank, DDP vs FSDP; chunked vs full logprobs; bucketed weight push
(docs/performance.md section 7).

Model: SmolLM2-135M's shape with random weights (Llama, hidden 576, 30 layers, 9 heads, 3 KV
heads, intermediate 1536, vocabulary 49152, tied embeddings; 134.5M parameters), float32, built
once into --work-dir. Three parts, each in fresh processes so that their peaks are their own:

train: 2 learner ranks (torch.multiprocessing, gloo, one thread each) build the learner exactly
as `asyncrl.learner.main` does (`_build_models`: DDP, or FSDP2 on each decoder layer and the
root) and run --steps `train_step`s (GRPO, one update per batch) on batches of one group of
--completions random completions of --tokens tokens per rank. Per rank: model state = the bytes
of the parameters, gradients and AdamW moments this rank holds (a DTensor counts its local
shard only), counted from the tensors; peak = the process's peak resident memory during the
timed steps (VmHWM, reset before them with /proc/self/clear_refs) above its resident memory
before them, which adds activations, logits and FSDP's transient all-gathers; step time is the
median over the timed steps.

logprobs: the token logprobs of 16 x 512 positions from final hidden states (the model's own
on random tokens), forward and backward through the lm_head: all at once (full (8192 x 49152)
float32 logits and their log-softmax) or learner.logprob_chunk_tokens at a time
(`asyncrl.learner.model.chunked_token_logprobs`, each chunk recomputed in the backward).
Peak = VmHWM above the resident memory before, time = median of --reps.

sync: one push of the model (`WeightSender.sync`, gloo, one generator process whose stand-in
engine receives bucket by bucket with `asyncrl.sync.weights.received_tensors` and copies each
tensor into its own copy of the model, as vLLM's reload does) with weight_sync.bucket_mb =
--bucket-mb;
peak extra memory of the learner and of the generator during the push (VmHWM above the
resident memory before it; both models are made resident first, since transformers maps the
weight file and pages first touched by the push would otherwise count). A whole-model flat
buffer would hold the push's size at each end.

Run from the repository root (about 6 minutes on 2 cores; the first run also builds the model):
    .venv/bin/python -m benchmarks.learner_memory --json learner_memory.json
With --lora-rank R the train part also runs both strategies with model.lora adapters of rank R
(the base frozen, AdamW over the adapters alone):
    .venv/bin/python -m benchmarks.learner_memory --parts train --lora-rank 16
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from benchmarks import common

HOST = "127.0.0.1"


def _parser():
    p = common.doc_parser(__doc__)
    p.add_argument("--parts", default="train,logprobs,sync")
    p.add_argument("--steps", type=int, default=3, help="timed train steps (after one warm-up)")
    p.add_argument("--completions", type=int, default=4)
    p.add_argument("--tokens", type=int, default=128, help="tokens per completion (train)")
    p.add_argument("--chunk", type=int, default=1024, help="learner.logprob_chunk_tokens")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--bucket-mb", type=int, default=64)
    p.add_argument("--lora-rank", type=int, default=0,
                   help="train: also ddp and fsdp with model.lora adapters of this rank on "
                        "every linear layer of the decoder blocks (alpha 2 x rank)")
    p.add_argument("--work-dir", default="~/.cache/asyncrl/bench")
    common.add_json_argument(p)
    return p


def build_model(work_dir: Path) -> Path:
    """SmolLM2-135M's shape, random init, with the tiny model's tokenizer (only its special
    token ids are used)."""
    out = work_dir / "smollm2-135m-shape"
    if (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from asyncrl.task.tiny_model import build_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                      max_position_embeddings=2048, rope_theta=100000.0,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    return out


# ------------------------------------------------------------------ memory of this process


def reset_peak() -> int:
    """Reset this process's peak resident memory (VmHWM) and return its resident bytes now."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def peak() -> int:
    return _status("VmHWM")


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


# ------------------------------------------------------------------ train: DDP vs FSDP


def _groups(rank: int, step: int, completions: int, tokens: int):
    """One group of `completions` completions of `tokens` tokens after a prompt of 16, rewards
    alternating 0 and 1."""
    from asyncrl.testing import make_groups

    return make_groups(1, completions, rng=1000 * step + rank, vocab_size=49152, min_token=3,
                       prompt_len=16, completion_len=tokens, finish_reason="length",
                       rewards=[[float(i % 2) for i in range(completions)]])


def train_rank(rank: int, world: int, store: str, model_dir: str, strategy: str, args: dict,
               out: str) -> None:
    import torch
    import torch.distributed as dist

    from asyncrl.config import RunConfig
    from asyncrl.learner.batch import collate
    from asyncrl.learner.main import _build_models
    from asyncrl.learner.model import load_policy
    from asyncrl.learner.shard import local_bytes
    from asyncrl.learner.step import train_step, warmup_schedule

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    cfg = RunConfig()
    cfg.model.path = model_dir
    cfg.learner.strategy = strategy
    cfg.learner.pack_row_tokens = 0  # every sequence is as long: nothing to pack
    torch.manual_seed(0)
    model, tok = load_policy(model_dir)
    if args.get("lora_rank"):
        from asyncrl import lora

        cfg.model.lora.rank = args["lora_rank"]
        lora.apply(model, args["lora_rank"], 2.0 * args["lora_rank"], 0.0,
                   cfg.model.lora.target_modules)
    model.train()
    models = _build_models(cfg, model, torch.device("cpu"), world)
    sched = warmup_schedule(models.policy_opt, cfg.learner.warmup_steps)
    times, rss_before, tokens = [], 0, 0
    for step in range(args["steps"] + 1):
        if step == 1:
            dist.barrier()
            rss_before = reset_peak()
        batch = collate(_groups(rank, step, args["completions"], args["tokens"]),
                        tok.pad_token_id)
        tokens = batch.input_ids.numel()
        t0 = time.perf_counter()
        train_step(models, batch, cfg.learner, 1.0, args["tokens"])
        sched.step()
        times.append(time.perf_counter() - t0)
    params = list(models.policy.parameters())
    state = [t for s in models.policy_opt.state.values() for t in s.values()
             if isinstance(t, torch.Tensor) and t.dim() > 0]
    got = {"params_bytes": local_bytes(params),
           "grads_bytes": local_bytes([p.grad for p in params]),
           "optimizer_bytes": local_bytes(state),
           "peak_step_bytes": peak() - rss_before, "rss_before_bytes": rss_before,
           "step_s": common.median(times[1:]), "tokens_per_rank": tokens}
    got["model_state_bytes"] = got["params_bytes"] + got["grads_bytes"] + got["optimizer_bytes"]
    every = [None] * world
    dist.all_gather_object(every, got)
    if rank == 0:
        Path(out).write_text(json.dumps(every))
    dist.destroy_process_group()


def run_train(model_dir: Path, args, tmp: Path) -> dict:
    import torch.multiprocessing as mp

    res = {}
    sides = [("ddp", 0), ("fsdp", 0)]
    if args.lora_rank:
        sides += [("ddp", args.lora_rank), ("fsdp", args.lora_rank)]
    for strategy, rank in sides:
        name = f"{strategy}+lora{rank}" if rank else strategy
        out = tmp / f"{name}.json"
        mp.start_processes(train_rank, nprocs=2, start_method="spawn", join=True,
                           args=(2, str(tmp / f"{name}.store"), str(model_dir), strategy,
                                 {"steps": args.steps, "completions": args.completions,
                                  "tokens": args.tokens, "lora_rank": rank}, str(out)))
        res[name] = json.loads(out.read_text())
    return res


# ------------------------------------------------------------------ logprobs: chunked vs full


def run_logprobs(model_dir: Path, args) -> dict:
    import torch

    from asyncrl.learner.model import chunked_token_logprobs, load_policy

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, _ = load_policy(model_dir)
    b, t = 16, 512
    ids = torch.randint(3, 49152, (b, t + 1))
    with torch.no_grad():  # the model's own final hidden states, one row at a time
        hidden = torch.cat([model.model(input_ids=ids[i : i + 1, :-1]).last_hidden_state
                            for i in range(b)]).reshape(b * t, -1)
    targets = ids[:, 1:].reshape(-1)
    head = model.get_output_embeddings()
    res = {}
    for name, chunk in (("full", b * t), ("chunked", args.chunk)):
        times, peaks, values = [], [], None
        for _ in range(args.reps):
            h = hidden.clone().requires_grad_(True)
            head.zero_grad(set_to_none=True)
            before = reset_peak()
            t0 = time.perf_counter()
            out = chunked_token_logprobs(head, h, targets, 1.0, chunk, with_entropy=True)
            (out[:, 0].sum() + 0.01 * out[:, 1].sum()).backward()
            times.append(time.perf_counter() - t0)
            peaks.append(peak() - before)
            values = out.detach()
            del out, h
        res[name] = {"seconds": common.median(times), "peak_bytes": max(peaks),
                     "values": values}
    diff = (res["full"].pop("values") - res["chunked"].pop("values")).abs()
    res["max_abs_diff_logprob"], res["max_abs_diff_entropy"] = (float(diff[:, 0].max()),
                                                                float(diff[:, 1].max()))
    res["tokens"], res["chunk_tokens"] = b * t, args.chunk
    return res


# ------------------------------------------------------------------ sync: one bucketed push


def _resident(model):
    """The model's weights in private resident memory: transformers maps the safetensors file,
    so pages first read (or written) during a push would otherwise count as the push's."""
    import torch

    with torch.no_grad():
        for t in model.state_dict().values():
            t.add_(0)
    return model


class _CopyingEngine:
    """Receives like asyncrl.sync.receiver (bucket by bucket into a BucketPool) and copies each
    tensor into its own model, as vLLM's reload does."""

    def __init__(self, model):
        self.params = dict(model.state_dict())
        self.pg = None
        self.peak_extra = 0

    def init_sync(self, host, port, rank, world_size, backend, timeout_s, prefix):
        from asyncrl.sync import group

        self.pg = group.init_group(host, port, rank, world_size, backend, timeout_s, prefix)

    def leave_sync(self):
        self.pg = None

    def receive_weights(self, specs, ipc=None, bucket_bytes=None):
        import torch

        from asyncrl import wire
        from asyncrl.sync import group, weights

        before = reset_peak()
        t0 = time.perf_counter()
        pool = weights.BucketPool(torch.device("cpu"))
        for name, t in weights.received_tensors(
                specs, weights.plan_buckets(specs, bucket_bytes), lambda buf: group.broadcast(
                    self.pg, buf, root=0), pool):
            self.params[name].copy_(t)
        self.peak_extra = peak() - before
        return time.perf_counter() - t0, wire.spec_bytes(specs)


def _generator(model_dir: str, base: int, out: str) -> None:
    import uuid

    import torch

    from asyncrl import transport
    from asyncrl.learner.model import load_policy
    from asyncrl.sync.member import LearnerFinished, SyncMember

    torch.set_num_threads(1)
    engine = _CopyingEngine(_resident(load_policy(model_dir)[0]))
    control = transport.Client(transport.context(), HOST, base + 2, "gen0")
    member = SyncMember(control, engine, "gen0", 1, uuid.uuid4().hex[:8], HOST, base + 3,
                        "gloo", 600.0, hello_interval_s=0.2, alone_timeout_s=600.0)
    try:
        while True:
            member.serve(timeout_s=0.1)
    except LearnerFinished:
        pass
    Path(out).write_text(json.dumps({"peak_extra_bytes": engine.peak_extra}))
    control.close()


def run_sync(model_dir: Path, args, tmp: Path) -> dict:
    import multiprocessing as mp

    import torch

    from asyncrl import transport
    from asyncrl.learner.model import load_policy
    from asyncrl.sync.sender import WeightSender

    base = common.free_base_port(1, 1)
    out = tmp / "generator.json"
    child = mp.get_context("spawn").Process(target=_generator,
                                            args=(str(model_dir), base, str(out)), daemon=True)
    child.start()
    try:
        torch.set_num_threads(1)
        model = _resident(load_policy(model_dir)[0])
        server = transport.Server(transport.context(), HOST, base + 2)
        sender = WeightSender(server, HOST, base + 3, 1, "gloo", timeout_s=600.0,
                              ready_timeout_s=600.0, bucket_bytes=args.bucket_mb << 20)
        sender.start()
        before = reset_peak()
        seconds, nbytes = sender.sync(model, 1, due=True)
        learner_extra = peak() - before
        sender.shutdown("benchmark done")
        child.join(120)
    finally:
        if child.is_alive():
            child.terminate()
    return {"push_bytes": nbytes, "push_s": seconds, "bucket_bytes": args.bucket_mb << 20,
            "learner_peak_extra_bytes": learner_extra,
            "generator_peak_extra_bytes": json.loads(out.read_text())["peak_extra_bytes"]}


# ------------------------------------------------------------------ report


def main(argv: list[str] | None = None) -> None:
    import tempfile

    args = _parser().parse_args(argv)
    parts = set(args.parts.split(","))
    model_dir = build_model(Path(args.work_dir).expanduser())
    print(f"# learner memory, SmolLM2-135M shape, random init, float32  ({common.machine()})")
    figures: dict = {}
    ratios: dict[str, float] = {}
    mb = 2**20
    with tempfile.TemporaryDirectory() as tmp:
        if "train" in parts:
            res = figures["train"] = run_train(model_dir, args, Path(tmp))
            rows = [[s, r, x["params_bytes"] / mb, x["grads_bytes"] / mb,
                     x["optimizer_bytes"] / mb, x["model_state_bytes"] / mb,
                     x["peak_step_bytes"] / mb, x["step_s"]]
                    for s in res for r, x in enumerate(res[s])]
            print(f"\ntrain: 2 ranks, {res['ddp'][0]['tokens_per_rank']} tokens per rank per "
                  "step, MiB per rank")
            print(common.table(["strategy", "rank", "params", "grads", "adam", "model state",
                                "step peak", "step s"], rows))
            ratios["fsdp_vs_ddp_model_state_bytes"] = (
                max(x["model_state_bytes"] for x in res["fsdp"])
                / max(x["model_state_bytes"] for x in res["ddp"]))
            ratios["fsdp_vs_ddp_step_s"] = (common.median([x["step_s"] for x in res["fsdp"]])
                                            / common.median([x["step_s"] for x in res["ddp"]]))
            for s in ("ddp", "fsdp"):
                if f"{s}+lora{args.lora_rank}" in res:
                    ratios[f"lora_vs_full_model_state_bytes_{s}"] = (
                        max(x["model_state_bytes"] for x in res[f"{s}+lora{args.lora_rank}"])
                        / max(x["model_state_bytes"] for x in res[s]))
        if "logprobs" in parts:
            res = figures["logprobs"] = run_logprobs(model_dir, args)
            print(f"\nlogprobs + entropy of {res['tokens']} positions, forward + backward "
                  f"through the lm_head (chunks of {res['chunk_tokens']})")
            print(common.table(["", "peak MiB", "seconds"],
                               [[k, res[k]["peak_bytes"] / mb, res[k]["seconds"]]
                                for k in ("full", "chunked")]))
            print(f"max |diff|: logprobs {res['max_abs_diff_logprob']:.2g}, entropy "
                  f"{res['max_abs_diff_entropy']:.2g}")
            ratios["chunked_vs_full_logprob_peak_bytes"] = (res["chunked"]["peak_bytes"]
                                                            / res["full"]["peak_bytes"])
            ratios["chunked_vs_full_logprob_s"] = (res["chunked"]["seconds"]
                                                   / res["full"]["seconds"])
        if "sync" in parts:
            res = figures["sync"] = run_sync(model_dir, args, Path(tmp))
            print(f"\nsync: one push of {res['push_bytes'] / mb:.0f} MiB in buckets of "
                  f"{res['bucket_bytes'] / mb:.0f} MiB, {res['push_s']:.2f} s; peak extra "
                  f"memory: learner {res['learner_peak_extra_bytes'] / mb:.0f} MiB, generator "
                  f"{res['generator_peak_extra_bytes'] / mb:.0f} MiB")
            for who in ("learner", "generator"):
                ratios[f"{who}_push_peak_extra_vs_bucket_bytes"] = (
                    res[f"{who}_peak_extra_bytes"] / res["bucket_bytes"])
                ratios[f"{who}_push_peak_extra_vs_push_bytes"] = (
                    res[f"{who}_peak_extra_bytes"] / res["push_bytes"])
    for k, v in ratios.items():
        print(f"{k}: {v:.3g}")
    common.write_json(args.json, figures, ratios)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
