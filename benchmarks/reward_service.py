"""Generator samples/s with the reward model in the reward service against scoring it inside
the generator, side by side in one process.

Both sides run the generator's own streaming rollout (asyncrl/generator/stream.py) on the
real vLLM engine with configs/rlhf.yaml's SFT policy, --groups groups of 8 completions at
temperature 1, up to 64 sequences in flight, one engine thread, and score every finished
group with configs/rlhf.yaml's reward model (builtin:addition-rm, trained and cached on
first use, ~2 minutes):
  inline   the generator's Scorer runs the reward model in the generator's process
           (transformers), blocking the engine loop while it scores (reward.service=false);
  service  the groups' texts go to a real `asyncrl reward` role (vLLM's pooling runner, its
           own process, net.curve on with the run's keys) through the generator's
           RemoteRewards; the loop keeps stepping the engine while groups wait for scores.
A side ends when its last group is scored. Reported: completions scored per second of wall
time, and the time groups waited for their scores. Under `ratios` in --json:
`samples_per_s_service_over_inline`. On this 2-core machine the role's process takes the
core the engine's one thread leaves; on a GPU host it takes a device of its own.

Run from the repository root (about 3 minutes after the models are built):
    .venv/bin/python -m benchmarks.reward_service [--groups 64] [--json PATH]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common


def _parser():
    p = common.doc_parser(__doc__)
    p.add_argument("--groups", type=int, default=64, help="groups of 8 completions per side")
    p.add_argument("--config", default="configs/rlhf.yaml")
    common.add_json_argument(p)
    return p


def _rollout_side(engine, cfg, prompt_ids, problems, args, delivery) -> dict:
    """Generate --groups groups and hand each finished one to `delivery` (a callable taking
    the finished units, returning how many completions it scored so far)."""
    from asyncrl.generator.stream import Rollout, SampleGroup

    gc = cfg.generator
    rollout = Rollout(engine, 64, "keep", time.monotonic)
    ids = list(prompt_ids)
    pending = [ids[i % len(ids)] for i in range(args.groups)]
    want = args.groups * gc.group_size
    t0 = time.perf_counter()
    scored = 0
    while scored < want:
        while pending and rollout.room(gc.group_size):
            pid = pending.pop(0)
            rollout.start(SampleGroup(pid, prompt_ids[pid], 0, gc.group_size, gc.temperature,
                                      gc.max_tokens, time.monotonic()), 0)
        if rollout.busy:
            rollout.step(0)
        scored = delivery(rollout.take_finished())
        if not rollout.busy and scored < want:
            time.sleep(0.002)
    seconds = time.perf_counter() - t0
    return {"completions": want, "seconds": seconds, "samples_per_s": want / seconds}


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    from prometheus_client import CollectorRegistry
    from transformers import AutoTokenizer

    from asyncrl import metrics, transport
    from asyncrl.config import load_config, save_config
    from asyncrl.generator.delivery import Scorer
    from asyncrl.generator.engine import VLLMEngine, configure_cpu_env, engine_length
    from asyncrl.generator.scoring import RemoteRewards
    from asyncrl.runner import resolve_model
    from asyncrl.task import encode_prompt, load_task

    print(f"# reward model in the reward service vs inside the generator ({common.machine()})")
    # the first reward model (no rounds of iterated preferences: RL runs to build): the same
    # network, which is what the throughput depends on
    cfg = resolve_model(load_config(args.config, ["reward.service=false", "rm.rounds=0"]))
    configure_cpu_env(cfg.generator.kv_cache_gib, 1)
    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    train, _ = load_task(cfg.task)
    problems = {p.id: p for p in train}
    prompt_ids = {p.id: encode_prompt(tok, p.prompt) for p in train[:512]}
    engine = VLLMEngine(cfg.model.path, "float32", 0,
                        engine_length(cfg, cfg.model.path, list(prompt_ids.values())), 0.85)
    m = metrics.GeneratorMetrics(CollectorRegistry())
    sides = {}

    scorer = Scorer(cfg, tok)  # the reward model in this process
    done = {"n": 0}

    def inline(units):
        for u in units:
            g = scorer.stream_group(problems[u.key], u, "gen0")
            done["n"] += len(g.completions)
        return done["n"]

    _rollout_side(engine, cfg, prompt_ids, problems, argparse_copy(args, 4), inline)  # warm-up
    done["n"] = 0
    sides["inline"] = _rollout_side(engine, cfg, prompt_ids, problems, args, inline)
    print(f"inline: {sides['inline']['samples_per_s']:.1f} completions/s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        base = common.free_block(common.run_port_offsets())
        svc_cfg = load_config(args.config, [f"run_dir={run_dir}", f"net.base_port={base}",
                                            "reward.service=true",
                                            f"task.reward_model={cfg.task.reward_model}",
                                            f"model.path={cfg.model.path}"])
        save_config(svc_cfg, run_dir / "config.yaml")
        transport.make_keys(run_dir / "keys")
        role = subprocess.Popen([sys.executable, "-m", "asyncrl", "reward", "--config",
                                 str(run_dir / "config.yaml")], stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            client = transport.Client(transport.context(), "127.0.0.1",
                                      svc_cfg.net.reward_port, "gen0",
                                      transport.load_keys(run_dir / "keys", "gen0"))
            remote = RemoteRewards(client, "gen0", "bench", svc_cfg.reward.window, 30.0, 300.0,
                                   "reward role", m)
            service_scorer = Scorer(svc_cfg, tok)
            waits: list[float] = []
            scored = {"n": 0}

            def service(units):
                if units:
                    texts = [service_scorer.texts(u.seqs) for u in units]
                    groups = [service_scorer.stream_group(problems[u.key], u, "gen0", t)
                              for u, t in zip(units, texts)]
                    remote.submit(groups, 0, time.monotonic(),
                                  [problems[u.key].prompt for u, t in zip(units, texts)
                                   for _ in t], [x for t in texts for x in t])
                for w in remote.pump(0.0):
                    waits.append(time.monotonic() - w.submitted_at)
                    scored["n"] += sum(len(g.completions) for g in w.groups)
                return scored["n"]

            _wait_for_role(remote, service)
            scored["n"], waits[:] = 0, []
            sides["service"] = _rollout_side(engine, cfg, prompt_ids, problems, args, service)
            sides["service"]["score_wait_s_mean"] = sum(waits) / max(1, len(waits))
        finally:
            import os
            import signal

            os.killpg(role.pid, signal.SIGKILL)
            role.wait()
    print(f"service: {sides['service']['samples_per_s']:.1f} completions/s (groups waited "
          f"{sides['service']['score_wait_s_mean'] * 1000:.0f} ms for scores on average)")
    ratio = sides["service"]["samples_per_s"] / sides["inline"]["samples_per_s"]
    print(common.table(["side", "completions", "seconds", "completions/s"],
                       [[k, v["completions"], f"{v['seconds']:.1f}", f"{v['samples_per_s']:.1f}"]
                        for k, v in sides.items()]))
    print(f"samples_per_s_service_over_inline: {ratio:.2f}")
    common.write_json(args.json, sides, {"samples_per_s_service_over_inline": ratio})


def argparse_copy(args, groups: int):
    import copy

    out = copy.copy(args)
    out.groups = groups
    return out


def _wait_for_role(remote, service) -> None:
    """Until the role answers (its engine starts in seconds to a minute)."""
    remote.submit([], 0, time.monotonic(), [], [])
    deadline = time.monotonic() + 300
    while remote.pending:
        service([])
        time.sleep(0.05)
        if time.monotonic() > deadline:
            raise TimeoutError("the reward role did not answer within 300 s")


if __name__ == "__main__":
    main()
