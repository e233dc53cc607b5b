"""vLLM vs transformers `generate`: sampling throughput on the tiny model
(docs/performance.md section 3).

The same tiny Llama (the embedded default's architecture and tokenizer, random weights, no
SFT), the same batch: --prompts addition-task prompts x --samples completions x --tokens
tokens, sampled at temperature 1 with no top-k/top-p, every completion forced to full length
(vLLM `ignore_eos=True`; transformers `min_new_tokens`), and each sampled token's logprob
returned by both (vLLM `logprobs=0` with processed logprobs, as the generator asks;
transformers `output_scores`, then a log-softmax), float32 on the CPU.

Each engine runs in its own child process, one after the other, with the same thread count
(--threads): vLLM through `asyncrl.generator.engine.configure_cpu_env` (OMP_NUM_THREADS, no
core binding, in-process engine) and `VLLMEngine`; transformers with
`torch.set_num_threads`. transformers is measured with eager attention (what the learner
loads) and with SDPA (its default, usually faster). One untimed warm-up call each, then the
median of --reps timed calls. Tokens/s counts generated tokens only.

Run from the repository root (60-120 s on 2 cores, a third of it vLLM start-up):
    .venv/bin/python -m benchmarks.generation [--json PATH]

`--json` writes each engine's tokens/s, and under `ratios`
`vllm_over_transformers_<attn>_tokens_per_s`.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from pathlib import Path

from benchmarks import common


def _parser() -> argparse.ArgumentParser:
    p = common.doc_parser(__doc__)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--samples", type=int, default=4, help="completions per prompt")
    p.add_argument("--tokens", type=int, default=32, help="tokens per completion")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of each engine")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--work-dir", default="~/.cache/asyncrl/bench")
    common.add_json_argument(p)
    return p


def _prompts(path: str, n: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from asyncrl.config import TaskConfig
    from asyncrl.task import encode_prompt, load_task

    tok = AutoTokenizer.from_pretrained(path)
    train, _ = load_task(TaskConfig())
    return [encode_prompt(tok, p.prompt) for p in train[:n]]


def run_vllm(path: str, args: argparse.Namespace, out) -> None:
    from asyncrl.generator.engine import configure_cpu_env

    configure_cpu_env(kv_cache_gib=1, threads=args.threads)
    import torch
    from vllm import SamplingParams, TokensPrompt

    from asyncrl.generator.engine import VLLMEngine

    prompts = [TokensPrompt(prompt_token_ids=p) for p in _prompts(path, args.prompts)]
    engine = VLLMEngine(path, "float32", seed=0, max_model_len=128, gpu_memory_utilization=0.85)
    params = SamplingParams(n=args.samples, temperature=1.0, max_tokens=args.tokens,
                            ignore_eos=True, logprobs=0, detokenize=False)

    def once() -> tuple[float, int]:
        t0 = time.perf_counter()
        outs = engine.llm.generate(prompts, params, use_tqdm=False)
        lps = [[d[t].logprob for t, d in zip(c.token_ids, c.logprobs)]
               for o in outs for c in o.outputs]  # what VLLMEngine.generate extracts
        return time.perf_counter() - t0, sum(map(len, lps))

    once()
    runs = [once() for _ in range(args.reps)]
    out.put(("vLLM", runs, torch.get_num_threads()))


def run_transformers(path: str, args: argparse.Namespace, attn: str, out) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation=attn).eval()
    prompts = _prompts(path, args.prompts)
    width = max(map(len, prompts))
    pad = model.config.pad_token_id
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left-padded
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1

    def once() -> tuple[float, int]:
        t0 = time.perf_counter()
        with torch.no_grad():
            res = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0,
                                 num_return_sequences=args.samples,
                                 max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                 pad_token_id=pad, return_dict_in_generate=True,
                                 output_scores=True)
            new = res.sequences[:, width:]  # (B*n, T)
            scores = torch.stack(res.scores, dim=1)  # (B*n, T, V), temperature applied
            lps = torch.log_softmax(scores, -1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        return time.perf_counter() - t0, lps.numel()

    once()
    runs = [once() for _ in range(args.reps)]
    out.put((f"transformers generate ({attn})", runs, torch.get_num_threads()))


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    from benchmarks.common import build_tiny_model, machine, median, table

    print(f"# sampling throughput, tiny model  ({machine()})")
    path = str(build_tiny_model(Path(args.work_dir).expanduser() / "tiny-random"))
    spawn = mp.get_context("spawn")
    results = []
    for target, extra in ((run_vllm, ()), (run_transformers, ("eager",)),
                          (run_transformers, ("sdpa",))):
        q = spawn.SimpleQueue()
        child = spawn.Process(target=target, args=(path, args, *extra, q))
        child.start()
        child.join(300)
        if child.exitcode != 0 or q.empty():
            raise RuntimeError(f"{target.__name__}{extra} failed (exit code {child.exitcode})")
        results.append(q.get())
    expect = args.prompts * args.samples * args.tokens
    vllm_rate = None
    rows, figures = [], {}
    for name, runs, threads in results:
        rates = [n / s for s, n in runs]
        if any(n != expect for _, n in runs):
            raise RuntimeError(f"{name} generated {[n for _, n in runs]} tokens, not {expect}")
        vllm_rate = vllm_rate or median(rates)
        figures[name] = {"threads": threads, "s_per_call": median([s for s, _ in runs]),
                         "tokens_per_s": median(rates), "tokens_per_s_runs": rates}
        rows.append([name, threads, f"{median([s for s, _ in runs]):.3f}", f"{median(rates):,.0f}",
                     " ".join(f"{r:,.0f}" for r in rates), f"{median(rates) / vllm_rate:.2f}"])
    print(f"batch: {args.prompts} prompts x {args.samples} samples x {args.tokens} tokens = "
          f"{expect} tokens per call, temperature 1, float32, median of {args.reps} calls")
    print(table(["engine", "threads", "s/call", "tokens/s", "all runs", "x vLLM"], rows))
    ratios = {f"vllm_over_transformers_{attn}_tokens_per_s":
              vllm_rate / figures[f"transformers generate ({attn})"]["tokens_per_s"]
              for attn in ("eager", "sdpa")}
    figures["batch"] = {"prompts": args.prompts, "samples": args.samples, "tokens": args.tokens}
    common.write_json(args.json, figures, ratios)


if __name__ == "__main__":
    main()
