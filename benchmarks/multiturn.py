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

Run from the repository root (about 2 minutes after the model is built):
    .venv/bin/python -m benchmarks.multiturn [--json PATH]
"""

from __future__ import annotations

import time

from benchmarks import common


def _parser():
    p = common.doc_parser(__doc__)
    p.add_argument("--groups", type=int, default=32, help="groups of 8 episodes per side")
    p.add_argument("--update-every", type=int, default=25,
                   help="engine steps between two weight updates (0: none)")
    p.add_argument("--config", default="configs/agent.yaml")
    common.add_json_argument(p)
    return p


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
    pending = list(train[: args.groups])
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
            "updates": version}


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    import gc

    from transformers import AutoTokenizer

    from asyncrl.config import load_config
    from asyncrl.generator.engine import configure_cpu_env
    from asyncrl.runner import resolve_model
    from asyncrl.task import load_task

    print(f"# multi-turn episodes: prefix caching salted by version vs off  ({common.machine()})")
    cfg = resolve_model(load_config(args.config))
    configure_cpu_env(cfg.generator.kv_cache_gib, 1)
    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    train, _ = load_task(cfg.task)
    sides = {}
    for name, caching in (("off", False), ("salted cache", True)):
        sides[name] = _side(cfg, tok, train, caching, args)
        gc.collect()
        s = sides[name]
        print(f"{name}: {s['episodes']} episodes, {s['turns_mean']:.2f} turns each, reward "
              f"{s['reward_mean']:.3f}, {s['updates']} updates; prompt tokens "
              f"{s['prompt_tokens']:,}, cached {s['cached_tokens']:,}, prefill computed "
              f"{s['prefill_tokens']:,}; {s['episodes_per_s']:.1f} episodes/s", flush=True)
    off, on = sides["off"], sides["salted cache"]
    ratios = {"prefill_tokens_cached_over_uncached": on["prefill_tokens"] / off["prefill_tokens"],
              "episodes_per_s_cached_over_uncached": on["episodes_per_s"] / off["episodes_per_s"]}
    print(common.table(["side", "prompt tokens", "cache hits", "prefill computed", "episodes/s"],
                       [[k, f"{v['prompt_tokens']:,}", f"{v['cached_tokens']:,}",
                         f"{v['prefill_tokens']:,}", f"{v['episodes_per_s']:.1f}"]
                        for k, v in sides.items()]))
    print(f"prefill computed, cached / uncached: "
          f"{ratios['prefill_tokens_cached_over_uncached']:.3f} (target <= 0.5); episodes/s: "
          f"{ratios['episodes_per_s_cached_over_uncached']:.2f}x")
    common.write_json(args.json, sides, ratios)


if __name__ == "__main__":
    main()
