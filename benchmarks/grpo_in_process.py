"""GRPO in one process, without vLLM, the buffer or weight sync: does the learner's update lift a
warm start's held-out accuracy, and does its gradient point up the expected reward?
(docs/performance.md section 9).

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

What it found (docs/performance.md section 9, 2026-12-01): the same loop lifts the
constant-rate warm starts (the embedded addition model 57% -> 72% in 40 steps) and lowers
every cosine-decayed one, whatever the task.

--check-gradient: instead of training, a finite-difference check of train_step's gradient.
The direction d: the mean over --batches on-policy batches (--groups prompts x
group_size, the same prompts each time) of the change train_step makes with SGD at lr 1 and
no gradient clipping, scaled to unit L2 norm; also its elementwise sign (Adam's first step)
and a random direction, each of unit norm. The expected reward J: the mean reward of
--samples completions on each of --prompts training prompts, drawn with the same random
numbers at every point (common random numbers), so that J(w + e d) - J(w - e d) is resolved
to a few thousandths. An unbiased policy gradient gives J(w + e d) > J(w - e d) for small e;
where J(w + e d) < J(w) already, steps of that size overshoot.

    .venv/bin/python -m benchmarks.grpo_in_process --model ~/.cache/asyncrl/tiny-addition-... \\
        --config configs/default.yaml [--steps 40] [--lr 1e-4] [--optimizer adamw|sgd] \\
        [key=value ...] [--json PATH]
    .venv/bin/python -m benchmarks.grpo_in_process --model DIR --check-gradient [--json PATH]

`--json` writes the accuracy by step, and under `ratios` `final_over_initial_accuracy`; with
--check-gradient J at every point, and under `ratios`
`plus_over_minus_expected_reward_<direction>_<e>`.
"""

from __future__ import annotations

import random

from benchmarks import common

CHECK_STEPS = (0.01, 0.03, 0.1, 0.3)  # the finite-difference steps e, in L2 norm of weights


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
    p.add_argument("--check-gradient", action="store_true",
                   help="the finite-difference check instead of training")
    p.add_argument("--batches", type=int, default=6, help="check: batches the gradient averages")
    p.add_argument("--prompts", type=int, default=48, help="check: prompts J is taken on")
    p.add_argument("--samples", type=int, default=128, help="check: samples per prompt for J")
    common.add_json_argument(p)
    return p


class Sampler:
    """The model and task of a config: sampling, scoring into TrajectoryGroups, greedy eval."""

    def __init__(self, args):
        import torch

        from asyncrl.config import load_config
        from asyncrl.learner.model import load_policy
        from asyncrl.rewards import combine
        from asyncrl.task import load_task

        torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        self.cfg = load_config(args.config, args.overrides)
        self.gc, self.lc = self.cfg.generator, self.cfg.learner
        self.model, self.tok = load_policy(args.model, "float32")
        self.train, held_out = load_task(self.cfg.task)
        self.held_out = held_out[: args.eval_problems]
        self.reward = combine(self.cfg.task.rewards or {self.cfg.task.eval_reward: 1.0})
        self.correct = combine({self.cfg.task.eval_reward: 1.0})
        self.pad, self.eos = self.tok.pad_token_id, self.tok.eos_token_id

    def generate(self, problems, n: int, greedy: bool, seed: int | None = None):
        """(prompt ids, sampled ids (B*n, T), their logprobs (B*n, T)), prompts left-padded;
        with a seed, the same random numbers at every call."""
        import torch

        from asyncrl.task import encode_prompt

        ids = [encode_prompt(self.tok, p.prompt) for p in problems]
        width = max(map(len, ids))
        x = torch.full((len(ids), width), self.pad)
        mask = torch.zeros_like(x)
        for i, p in enumerate(ids):
            x[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        if seed is not None:
            torch.manual_seed(seed)
        self.model.eval()
        with torch.no_grad():
            out = self.model.generate(
                input_ids=x, attention_mask=mask, do_sample=not greedy,
                temperature=self.gc.temperature if not greedy else None, top_k=None, top_p=None,
                num_return_sequences=n, max_new_tokens=self.gc.max_tokens,
                pad_token_id=self.pad, return_dict_in_generate=True, output_scores=True)
        self.model.train()
        new = out.sequences[:, width:]
        scores = torch.stack(out.scores, 1).float()
        return ids, new, torch.log_softmax(scores, -1).gather(-1, new[..., None])[..., 0]

    def text(self, row: list[int]) -> tuple[list[int], str]:
        n = row.index(self.eos) + 1 if self.eos in row else len(row)
        return row[:n], self.tok.decode(row[:n], skip_special_tokens=True)

    def groups(self, problems, version: int, seed: int | None = None):
        """(the TrajectoryGroups a generator would send for `problems`, their rewards)."""
        from asyncrl.testing import make_groups

        n = self.gc.group_size
        ids, new, lps = self.generate(problems, n, greedy=False, seed=seed)
        tokens, logprobs, rewards, finish = ([[] for _ in problems] for _ in range(4))
        for k in range(len(new)):  # completion k is problem k // n's
            row, completion = self.text(new[k].tolist())
            tokens[k // n].append(row)
            logprobs[k // n].append(lps[k, : len(row)].numpy())
            rewards[k // n].append(self.reward(completion, problems[k // n].answer))
            finish[k // n].append("stop" if row[-1] == self.eos else "length")
        groups = make_groups(len(problems), n, prompts=ids, tokens=tokens, logprobs=logprobs,
                             rewards=rewards, finish_reason=finish, policy_version=version)
        return groups, [r for rs in rewards for r in rs]

    def accuracy(self) -> float:
        import numpy as np

        _, new, _ = self.generate(self.held_out, 1, greedy=True)
        return float(np.mean([self.correct(self.text(r.tolist())[1], p.answer)
                              for p, r in zip(self.held_out, new, strict=True)]))

    def expected_reward(self, problems, samples: int, seed: int) -> float:
        """Mean reward of `samples` completions per problem, with common random numbers."""
        import numpy as np

        _, new, _ = self.generate(problems, samples, greedy=False, seed=seed)
        return float(np.mean([self.reward(self.text(new[k].tolist())[1],
                                          problems[k // samples].answer)
                              for k in range(len(new))]))


def train(s: Sampler, args) -> None:
    import numpy as np
    import torch

    from asyncrl.learner.batch import collate
    from asyncrl.learner.step import Models, train_step, warmup_schedule

    rng = random.Random(args.seed)
    model, lc, gc = s.model, s.lc, s.gc
    opt = (torch.optim.SGD(model.parameters(), lr=args.lr) if args.optimizer == "sgd" else
           torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=lc.weight_decay,
                             eps=lc.adam_eps))
    sched = warmup_schedule(opt, lc.warmup_steps)
    lc.lr = args.lr
    print(f"# in-process GRPO  ({common.machine()})\n{args.model}, {args.optimizer} lr {args.lr}, "
          f"{args.groups} x {gc.group_size} completions per step")
    by_step = {0: s.accuracy()}
    rewards = {}
    print(f"step 0: held-out accuracy {by_step[0]:.3f}", flush=True)
    for step in range(1, args.steps + 1):
        groups, got = s.groups(rng.sample(s.train, args.groups), step - 1)
        train_step(Models(model, opt), collate(groups, s.pad), lc, temperature=gc.temperature,
                   max_tokens=gc.max_tokens)
        sched.step()
        rewards[step] = float(np.mean(got))
        if step % args.eval_every == 0 or step == args.steps:
            by_step[step] = s.accuracy()
            print(f"step {step}: sampled reward {rewards[step]:.3f}, held-out accuracy "
                  f"{by_step[step]:.3f}", flush=True)
    final = by_step[args.steps]
    ratios = {"final_over_initial_accuracy": final / by_step[0] if by_step[0] else float("nan")}
    common.write_json(args.json, {"accuracy_by_step": by_step, "sampled_reward_by_step": rewards,
                                  "model": args.model, "optimizer": args.optimizer,
                                  "lr": args.lr}, ratios)


def check_gradient(s: Sampler, args) -> None:
    import torch

    from asyncrl.learner.batch import collate
    from asyncrl.learner.step import Models, train_step

    model, lc, gc = s.model, s.lc, s.gc
    lc.max_grad_norm = 1e30  # the raw gradient: no clipping
    problems = random.Random(args.seed).sample(s.train, max(args.prompts, args.groups))
    start = {k: v.detach().clone() for k, v in model.named_parameters()}

    def move_to(direction: dict | None, e: float = 0.0) -> None:
        with torch.no_grad():
            for k, v in model.named_parameters():
                v.copy_(start[k] if direction is None else start[k] + e * direction[k])

    mean = {k: torch.zeros_like(v) for k, v in start.items()}
    for b in range(args.batches):
        move_to(None)
        groups, _ = s.groups(problems[: args.groups], 0, seed=1000 + b)
        train_step(Models(model, torch.optim.SGD(model.parameters(), lr=1.0)),
                   collate(groups, s.pad), lc, temperature=gc.temperature,
                   max_tokens=gc.max_tokens)
        with torch.no_grad():
            for k, v in model.named_parameters():
                mean[k] += (v - start[k]) / args.batches
    move_to(None)

    def unit(d: dict) -> dict:
        norm = torch.sqrt(sum((v.double() ** 2).sum() for v in d.values())).item()
        return {k: v / norm for k, v in d.items()}

    g = torch.Generator().manual_seed(args.seed)
    directions = {"gradient": unit(mean), "sign": unit({k: v.sign() for k, v in mean.items()}),
                  "random": unit({k: torch.randn(v.shape, generator=g) for k, v in mean.items()})}
    on = problems[: args.prompts]
    j0 = s.expected_reward(on, args.samples, args.seed)
    print(f"# finite-difference check of train_step's gradient  ({common.machine()})\n"
          f"{args.model}: J = mean reward of {args.samples} samples on {len(on)} prompts; "
          f"gradient averaged over {args.batches} batches of {args.groups} x {gc.group_size}\n"
          f"J(w) = {j0:.4f}")
    rows, figures, ratios = [], {"J": j0}, {}
    for name, d in directions.items():
        for e in CHECK_STEPS:
            move_to(d, e)
            plus = s.expected_reward(on, args.samples, args.seed)
            move_to(d, -e)
            minus = s.expected_reward(on, args.samples, args.seed)
            move_to(None)
            rows.append([name, f"{e:g}", f"{plus:.4f}", f"{minus:.4f}", f"{plus - minus:+.4f}"])
            print(f"{name} e={e:g}: J(w + e d) {plus:.4f}, J(w - e d) {minus:.4f}", flush=True)
            figures[f"{name}_{e:g}"] = {"plus": plus, "minus": minus}
            ratios[f"plus_over_minus_expected_reward_{name}_{e:g}"] = (
                plus / minus if minus else float("nan"))
    print(common.table(["direction", "e", "J(w + e d)", "J(w - e d)", "difference"], rows))
    common.write_json(args.json, figures, ratios)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    s = Sampler(args)
    (check_gradient if args.check_gradient else train)(s, args)


if __name__ == "__main__":
    main()
