"""GRPO in one process, without vLLM, the buffer or weight sync: does the learner's update lift a
warm start's held-out accuracy? (issue 13's diagnosis, docs/performance.md section 9).

Each step samples --groups prompts x generator.group_size completions from the current weights
with transformers `generate` (temperature generator.temperature; transformers keeps its
default top-k of 50, which on the tiny models' 259-token vocabulary cuts a negligible mass,
so the behaviour logprobs are those of the learner's own forward), scores
them with the task's reward (task.rewards, or task.eval_reward when none is set), builds the
TrajectoryGroups a generator would send (behaviour logprobs from the same forward that
sampled), and runs `asyncrl.learner.step.train_step` on them with the config's learner
settings (one epoch, one minibatch: on-policy) and an AdamW or SGD optimizer with the config's
warm-up. Every --eval-every steps it reports greedy accuracy on the first --eval-problems
held-out problems. Single-threaded by default so two can run side by side.

What it found (session 7): the same loop lifts the constant-rate warm starts (the embedded
addition model 57% -> 72% in 40 steps) and lowers every cosine-decayed one, whatever the task.

    .venv/bin/python -m benchmarks.grpo_in_process --model ~/.cache/asyncrl/tiny-addition-... \\
        --config configs/default.yaml [--steps 40] [--lr 1e-4] [--optimizer adamw|sgd] \\
        [key=value ...] [--json PATH]

`--json` writes the accuracy by step, and under `ratios` `final_over_initial_accuracy`.
"""

from __future__ import annotations

import random

from benchmarks import common


def _parser():
    p = common.doc_parser(__doc__)
    p.add_argument("--model", required=True, help="a model directory (e.g. a cached builtin)")
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--groups", type=int, default=16, help="prompts per step")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-problems", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    common.add_json_argument(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    import numpy as np
    import torch

    from asyncrl import wire
    from asyncrl.config import load_config
    from asyncrl.learner.batch import collate
    from asyncrl.learner.model import load_policy
    from asyncrl.learner.step import Models, train_step, warmup_schedule
    from asyncrl.rewards import combine
    from asyncrl.task import encode_prompt, load_task

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    cfg = load_config(args.config, args.overrides)
    gc, lc = cfg.generator, cfg.learner
    model, tok = load_policy(args.model, "float32")
    train, held_out = load_task(cfg.task)
    held_out = held_out[: args.eval_problems]
    reward = combine(cfg.task.rewards or {cfg.task.eval_reward: 1.0})
    correct = combine({cfg.task.eval_reward: 1.0})
    pad, eos = tok.pad_token_id, tok.eos_token_id

    def generate(problems, n: int, greedy: bool):
        """(prompt ids, sampled ids (B*n, T), their logprobs (B*n, T)), prompts left-padded."""
        ids = [encode_prompt(tok, p.prompt) for p in problems]
        width = max(map(len, ids))
        x = torch.full((len(ids), width), pad)
        mask = torch.zeros_like(x)
        for i, p in enumerate(ids):
            x[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        model.eval()
        with torch.no_grad():
            out = model.generate(input_ids=x, attention_mask=mask, do_sample=not greedy,
                                 temperature=gc.temperature if not greedy else None, top_k=None,
                                 top_p=None, num_return_sequences=n, max_new_tokens=gc.max_tokens,
                                 pad_token_id=pad, return_dict_in_generate=True,
                                 output_scores=True)
        model.train()
        new = out.sequences[:, width:]
        scores = torch.stack(out.scores, 1).float()
        return ids, new, torch.log_softmax(scores, -1).gather(-1, new[..., None])[..., 0]

    def text(row: list[int]) -> tuple[list[int], str]:
        n = row.index(eos) + 1 if eos in row else len(row)
        return row[:n], tok.decode(row[:n], skip_special_tokens=True)

    def accuracy() -> float:
        _, new, _ = generate(held_out, 1, greedy=True)
        return float(np.mean([correct(text(r.tolist())[1], p.answer)
                              for p, r in zip(held_out, new, strict=True)]))

    opt = (torch.optim.SGD(model.parameters(), lr=args.lr) if args.optimizer == "sgd" else
           torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=lc.weight_decay,
                             eps=lc.adam_eps))
    sched = warmup_schedule(opt, lc.warmup_steps)
    lc.lr = args.lr
    print(f"# in-process GRPO  ({common.machine()})\n{args.model}, {args.optimizer} lr {args.lr}, "
          f"{args.groups} x {gc.group_size} completions per step")
    by_step = {0: accuracy()}
    rewards = {}
    print(f"step 0: held-out accuracy {by_step[0]:.3f}", flush=True)
    for step in range(1, args.steps + 1):
        problems = rng.sample(train, args.groups)
        ids, new, lps = generate(problems, gc.group_size, greedy=False)
        groups, got = [], []
        for i, p in enumerate(problems):
            comps = []
            for j in range(gc.group_size):
                k = i * gc.group_size + j
                tokens, completion = text(new[k].tolist())
                r = reward(completion, p.answer)
                got.append(r)
                comps.append(wire.Completion(np.array(tokens, np.int32),
                                             lps[k, : len(tokens)].numpy().astype(np.float32), r,
                                             "stop" if tokens[-1] == eos else "length"))
            groups.append(wire.TrajectoryGroup(i, np.array(ids[i], np.int32), step - 1, comps))
        train_step(Models(model, opt), collate(groups, pad), lc, temperature=gc.temperature,
                   max_tokens=gc.max_tokens)
        sched.step()
        rewards[step] = float(np.mean(got))
        if step % args.eval_every == 0 or step == args.steps:
            by_step[step] = accuracy()
            print(f"step {step}: sampled reward {rewards[step]:.3f}, held-out accuracy "
                  f"{by_step[step]:.3f}", flush=True)
    final = by_step[args.steps]
    ratios = {"final_over_initial_accuracy": final / by_step[0] if by_step[0] else float("nan")}
    common.write_json(args.json, {"accuracy_by_step": by_step, "sampled_reward_by_step": rewards,
                                  "model": args.model, "optimizer": args.optimizer,
                                  "lr": args.lr}, ratios)


if __name__ == "__main__":
    main()
