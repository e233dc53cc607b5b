"""Episodes per second through the OpenAI-compatible endpoint against the in-process episode
loop, on the same engine (docs/environments.md, "Bring your own agent").

Every side runs the agentic task (configs/agent.yaml: the warm-started calculator model, built
and cached on first use) on one real vLLM engine (in-process, float32, one thread, prefix
cache on and salted as episodes run it, 32-token blocks), at most 64 sequences in the engine
at once (generator.max_inflight 64), groups of 8 episodes at temperature 1, no weight
updates, one after the other, in turn:
  in-process    the generator's own episode loop (asyncrl/generator/episode.py): the
                calculator environment runs in the generator's threads between engine steps
                (64 episodes open: each is in the engine but for the environment's step).
  endpoint      the calculator loop as an agent of its own (asyncrl/agents/calculator.py),
                run by the task.agent driver in its agent process with the real `openai`
                client against the generator's endpoint over HTTP on loopback
                (asyncrl/generator/endpoint.py, driver.py): every turn is a /v1/completions
                call, its prompt rendered and matched against the episode, the reply decoded,
                JSON both ways; generator.agent_episodes' default, 128 episodes open.
  endpoint-64   the same with 64 episodes open (generator.agent_episodes=64), for the effect
                of keeping more episodes open than engine slots.
Each side runs --groups groups per round after one untimed warm-up group, for --rounds rounds;
episodes/s = trained episodes / wall seconds (an endpoint episode whose calls do not merge is
served and not trained: counted as not_mergeable), median over rounds. Under `ratios` in
--json: `episodes_per_s_endpoint_over_in_process` (target: at least 0.8) and
`episodes_per_s_endpoint64_over_in_process`.

Run from the repository root (about 3 minutes after the model is built):
    .venv/bin/python -m benchmarks.agent_endpoint [--groups 16] [--json PATH]
"""

from __future__ import annotations

import time
from collections import Counter

from benchmarks import common


def _parser():
    p = common.doc_parser(__doc__)
    p.add_argument("--groups", type=int, default=16, help="groups of 8 episodes per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--config", default="configs/agent.yaml")
    common.add_json_argument(p)
    return p


def _in_process(engine, cfg, tok, problems, length) -> tuple[list, float]:
    from asyncrl.generator.episode import EpisodeGroup, episode_parts
    from asyncrl.generator.stream import Rollout

    spec, codec, budgets = episode_parts(cfg, tok, length)
    rollout = Rollout(engine, 64, "keep", time.monotonic, salt_versions=True)
    pending, done = list(problems), []
    t0 = time.perf_counter()
    while pending or rollout.busy:
        while pending and rollout.room(8):
            p = pending.pop(0)
            rollout.start(EpisodeGroup(p.id, [p] * 8, spec, codec, budgets, 1.0, 0, 0.0), 0)
        rollout.step(0)
        done += rollout.take_finished()
        if not rollout.running:
            time.sleep(0.002)
    return [e for u in done for e in u.episodes], time.perf_counter() - t0


def _endpoint(engine, ep, driver, problems, open_groups: int) -> tuple[list, float]:
    from asyncrl.generator.stream import Rollout

    rollout = Rollout(engine, 64, "keep", time.monotonic, salt_versions=True)
    pending, done = list(problems), []
    t0 = time.perf_counter()
    # Until every episode has ended and been taken (a group dropped as not mergeable counts
    # in the episodes' outcomes, not in `done`).
    while (pending or driver.groups or rollout.busy or ep.busy or ep.episodes
           or not ep.inbox.empty()):
        while pending and driver.groups < open_groups:  # the engine runs 64 at most
            driver.launch(pending.pop(0), 8)
        ep.poll(rollout, 0)
        if rollout.busy:
            rollout.step(0)
        for unit in rollout.take_finished():
            ep.finished(unit)
        done += ep.take_groups()
        if not rollout.running:
            time.sleep(0.001)
    seconds = time.perf_counter() - t0
    return [e for g in done for e in g.episodes], seconds


def main(argv: list[str] | None = None) -> None:
    from prometheus_client import CollectorRegistry
    from transformers import AutoTokenizer

    from asyncrl.agents.calculator import episode
    from asyncrl.config import load_config
    from asyncrl.generator.driver import Driver
    from asyncrl.generator.endpoint import Endpoint
    from asyncrl.generator.engine import VLLMEngine, configure_cpu_env, engine_length
    from asyncrl.metrics import GeneratorMetrics
    from asyncrl.runner import resolve_model
    from asyncrl.task import load_task

    args = _parser().parse_args(argv)
    print(common.machine())
    cfg = resolve_model(load_config(args.config, [
        f"net.base_port={common.free_base_port()}", "net.bind_host=127.0.0.1",
        "generator.episode_timeout_s=600"]), print)
    configure_cpu_env(1, 1)
    length = engine_length(cfg, cfg.model.path, [])
    engine = VLLMEngine(cfg.model.path, "float32", 0, length, 0.85, prefix_caching=True,
                        block_size=32)
    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    train, _ = load_task(cfg.task)
    cfg.task.agent = "asyncrl.agents.calculator:episode"  # the endpoint side's
    ep = Endpoint(cfg, tok, "gen0", 0, length, "sk-asyncrl-bench",
                  GeneratorMetrics(CollectorRegistry()))
    ep.start()
    driver = Driver(episode, ep)  # its agent process lives through every round, as in a run
    _in_process(engine, cfg, tok, train[-1:], length)  # warm-up: not timed
    _endpoint(engine, ep, driver, train[-2:-1], 16)
    sides = {"in-process": 0, "endpoint": 2 * 64 // 8, "endpoint-64": 64 // 8}  # open groups
    rates: dict[str, list[float]] = {side: [] for side in sides}
    figures: dict = {"groups": args.groups, "rounds": args.rounds}
    at = 0
    for r in range(args.rounds):
        for side, open_groups in sides.items():
            problems = train[at:at + args.groups]
            at += args.groups
            episodes, seconds = (_in_process(engine, cfg, tok, problems, length)
                                 if side == "in-process"
                                 else _endpoint(engine, ep, driver, problems, open_groups))
            rate = len(episodes) / seconds
            rates[side].append(rate)
            turns = sum(e.turns for e in episodes) / max(1, len(episodes))
            reward = sum(e.reward for e in episodes) / max(1, len(episodes))
            ends = Counter(getattr(e, "outcome", "") or e.finish_reason for e in episodes)
            print(f"round {r + 1} {side}: {len(episodes)} episodes in {seconds:.1f}s = "
                  f"{rate:.1f} episodes/s, {turns:.2f} turns each, reward {reward:.3f}, "
                  f"{dict(ends)}", flush=True)
            figures[f"{side}_round{r + 1}"] = {"episodes": len(episodes), "seconds": seconds,
                                               "turns_mean": turns, "reward_mean": reward}
    driver.close()
    ep.close()
    med = {k: common.median(v) for k, v in rates.items()}
    ratio = med["endpoint"] / med["in-process"]
    ratio64 = med["endpoint-64"] / med["in-process"]
    print(common.table(["side", "episodes/s (median)", "rounds"],
                       [[k, f"{v:.1f}", ", ".join(f"{x:.1f}" for x in rates[k])]
                        for k, v in med.items()]))
    print(f"episodes_per_s_endpoint_over_in_process: {ratio:.3f} (target >= 0.8)")
    print(f"episodes_per_s_endpoint64_over_in_process: {ratio64:.3f}")
    figures.update({f"{k}_episodes_per_s": v for k, v in med.items()})
    common.write_json(args.json, figures, {"episodes_per_s_endpoint_over_in_process": ratio,
                                           "episodes_per_s_endpoint64_over_in_process": ratio64})


if __name__ == "__main__":
    main()
