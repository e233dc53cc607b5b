"""The `asyncrl` command.

    asyncrl run CONFIG [key=value ...]       everything: prepare the model, start all roles
    asyncrl prepare CONFIG [key=value ...]   build the embedded default model (SFT) only
    asyncrl train-rm CONFIG [key=value ...]  train a reward model on preferences (rm.*)
    asyncrl buffer --config CONFIG           one role, e.g. on its own host
    asyncrl generator --config CONFIG --index I
    asyncrl evaluator --config CONFIG        the evaluation engine (generator.eval_engine)
    asyncrl reward --config CONFIG           the reward service (reward.service)
    asyncrl learner --config CONFIG          wraps torchrun --nproc-per-node learner.nproc
    asyncrl plot RUN_DIR                     redraw RUN_DIR/curves.png from metrics.jsonl
    asyncrl replay RUN_DIR                   re-train on the logged batches, compare weights
    asyncrl study staleness ... CONFIG       a grid of runs over staleness and correction
    asyncrl study rlhf ... CONFIG            reward-model over-optimisation: KL coef x RM size
    asyncrl keys DIR [--generators N]        make a run's CURVE keys (roles started on their own)
    asyncrl audit RUN_DIR                    was every acknowledged group trained exactly once?

Heavy modules (torch, vllm, transformers) are imported after argument parsing, so `--help`
answers at once and a config error is reported before anything slow starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from asyncrl.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asyncrl", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, helptext in (("run", "prepare the model and run every role"),
                           ("prepare", "build the embedded default model only"),
                           ("train-rm", "train a reward model on preference pairs or scored "
                                        "responses (rm.*; docs/rlhf.md)")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("config", help="YAML file in configs/ (e.g. configs/default.yaml)")
        s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. learner.lr=1e-4")
    for name in ("buffer", "generator", "evaluator", "reward", "learner"):
        s = sub.add_parser(name, help=f"run the {name} role alone")
        s.add_argument("--config", required=True)
        s.add_argument("overrides", nargs="*")
        if name == "generator":
            s.add_argument("--index", type=int, default=0)
    s = sub.add_parser("plot", help="redraw RUN_DIR/curves.png")
    s.add_argument("run_dir")
    s = sub.add_parser("study", help="a grid of runs and a report (staleness sweep, "
                                     "reward-model over-optimisation)")
    s.add_argument("kind", choices=["staleness", "rlhf"])
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    s.add_argument("--max-staleness", default=None,
                   help="comma-separated bounds (staleness: default 0,1,2,4,8; rlhf: one more "
                        "axis when given)")
    s.add_argument("--kl-coef", default="0.01,0.05,0.2",
                   help="rlhf: comma-separated learner.kl_coef values")
    s.add_argument("--rm-pairs", default="500,2000,8000",
                   help="rlhf: comma-separated reward-model training sizes (rm.pairs)")
    s.add_argument("--correction", default="none,tis,decoupled",
                   help="comma-separated learner.offpolicy values")
    s.add_argument("--seeds", type=int, default=1)
    s.add_argument("--target", type=float, default=0.8,
                   help="accuracy for the time-to-target column")
    s.add_argument("--out", default=None,
                   help="sweep directory (resumable; default studies/<kind>)")
    s = sub.add_parser("audit", help="check from RUN_DIR alone that every group the buffer "
                                     "acknowledged was trained once, dropped as stale or held")
    s.add_argument("run_dir")
    s = sub.add_parser("keys", help="make the CURVE key pairs for roles started on their own "
                                    "(give every role this directory as net.keys_dir)")
    s.add_argument("dir")
    s.add_argument("--generators", type=int, default=None,
                   help="one key pair per generator (default: generator.num_generators of "
                        "--config, else 1)")
    s.add_argument("--config", help="the run's config: its generator.num_generators")
    s = sub.add_parser("replay", help="re-train a finished run's learner on its logged batches "
                                      "and compare the weights' checksum")
    s.add_argument("run_dir")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # key=value overrides may also follow options (argparse stops collecting them there)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in x or x.startswith("-")
                                                  for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.cmd} %(name)s: %(message)s")
    try:
        return COMMANDS[args.cmd](args)
    except ConfigError as e:
        print(f"asyncrl: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, TimeoutError, OSError, ValueError) as e:
        print(f"asyncrl {args.cmd}: {e}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------- one function per command
# Each takes the parsed arguments and returns the exit code; the work lives elsewhere.


def _config(args):
    return load_config(args.config, args.overrides)


def _run(args) -> int:
    from asyncrl.runner import execute_run

    return execute_run(_config(args))


def _prepare(args) -> int:
    from asyncrl.runner import resolve_model

    print(resolve_model(_config(args)).model.path)
    return 0


def _train_rm(args) -> int:
    import time

    from asyncrl.config import RM_EXACT_BASE
    from asyncrl.rm.train import exact_base, train_reward_model
    from asyncrl.runner import resolve_model

    cfg = _config(args)
    if cfg.rm.base == RM_EXACT_BASE:
        cfg.rm.base = exact_base(cfg, cfg.model.path)
    rm_given = cfg.task.reward_model
    cfg.task.reward_model = ""  # the model being trained is not needed to train it
    cfg = resolve_model(cfg)
    cfg.task.reward_model = rm_given
    out = Path(cfg.rm.out or Path("runs") / f"{cfg.name}-rm-{time.strftime('%Y%m%d-%H%M%S')}")
    if cfg.rm.rounds and cfg.rm.data.startswith("builtin:"):
        return _train_rm_rounds(cfg, out)
    if cfg.rm.rounds:  # configs/rlhf.yaml's rounds, with a user's file: no raters for rounds
        print(f"[train-rm] note: rm.rounds={cfg.rm.rounds} is for the builtin preferences, "
              "whose raters can label new policies' samples; training on "
              f"rm.data={cfg.rm.data} alone")
    summary = train_reward_model(cfg, out)
    print(f"[train-rm] held-out accuracy {summary['held_out_accuracy']:.1%} on "
          f"{summary['held_out_rows']} pairs; reward model written to {out.resolve()} "
          f"(task.reward_model={out.resolve()})")
    return 0


def _train_rm_rounds(cfg, out: Path) -> int:
    """rm.rounds: the first reward model and every round in OUT.rounds/ (a stopped command
    goes on from there), the last round's reward model in OUT."""
    from asyncrl.rm.rounds import iterate, percent
    from asyncrl.rm.train import train_reward_model
    from asyncrl.task.build import build_once

    work = out.with_name(out.name + ".rounds")
    first = work / "round-0"
    if not (first / "config.json").is_file():
        work.mkdir(parents=True, exist_ok=True)
        build_once(first, lambda tmp: train_reward_model(cfg, tmp))
    iterate(cfg, first, out, work)
    rounds = json.loads((out / "rounds.json").read_text())
    print(f"[train-rm] {len(rounds)} round(s) of iterated preferences; agreement with the gold "
          "preference: " + ", ".join(f"{k} {percent(v)}"
                                     for k, v in rounds[-1]["agreement"].items())
          + f"; reward model written to {out.resolve()} (task.reward_model={out.resolve()})")
    return 0


def _reward_role(args) -> int:
    cfg = _config(args)
    if cfg.reward.device_ids:  # before vLLM (and CUDA) is imported
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, cfg.reward.device_ids))
    from asyncrl.generator.engine import configure_cpu_env, on_gpu
    from asyncrl.reward.main import run
    from asyncrl.runner import resolve_model

    gpu = on_gpu()
    if not gpu:
        configure_cpu_env(1, 1)
    cfg = resolve_model(cfg)
    if not cfg.task.reward_model:
        raise ConfigError("asyncrl reward serves task.reward_model, which is empty")
    run(cfg, gpu)
    return 0


def _buffer(args) -> int:
    from asyncrl.buffer.main import run
    from asyncrl.runner import resolve_model, role_run_dir

    cfg = resolve_model(_config(args))
    if cfg.buffer.durable:
        role_run_dir(cfg)  # the durable log lives in RUN_DIR/buffer/
    vocab = json.loads((Path(cfg.model.path) / "config.json").read_text()).get("vocab_size")
    run(cfg, vocab_size=vocab)
    return 0


def _generator(args) -> int:
    cfg = _config(args)
    if not 0 <= args.index < cfg.generator.num_generators:
        raise ConfigError(f"--index {args.index} outside generator.num_generators="
                          f"{cfg.generator.num_generators}")
    if cfg.generator.device_ids:  # before vLLM (and CUDA) is imported
        tp = cfg.generator.tensor_parallel_size
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(
            map(str, cfg.generator.device_ids[args.index * tp : (args.index + 1) * tp]))
    from asyncrl.generator.main import run
    from asyncrl.runner import resolve_model, role_run_dir

    resolve_model(cfg)
    run(cfg, args.index, cfg.model.path, role_run_dir(cfg))
    return 0


def _evaluator(args) -> int:
    cfg = _config(args)
    gen = cfg.generator
    if not gen.eval_engine:
        raise ConfigError("generator.eval_engine is false: the learner asks the generators to "
                          "evaluate, never this evaluator; set generator.eval_engine=true")
    if gen.device_ids:  # the GPUs after the generators' (before vLLM and CUDA are imported)
        tp = gen.tensor_parallel_size
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(
            map(str, gen.device_ids[gen.num_generators * tp : (gen.num_generators + 1) * tp]))
    from asyncrl.generator.eval_engine import run
    from asyncrl.runner import resolve_model, role_run_dir

    resolve_model(cfg)
    run(cfg, cfg.model.path, role_run_dir(cfg))
    return 0


def _learner(args) -> int:
    from asyncrl.launcher import run_learner
    from asyncrl.runner import resolve_model, role_run_dir

    cfg = resolve_model(_config(args))
    return run_learner(cfg, role_run_dir(cfg))


def _plot(args) -> int:
    from asyncrl.plots import plot_episodes, plot_run

    run = Path(args.run_dir)
    print(plot_run(run / "metrics.jsonl", run / "curves.png"))
    episodes = plot_episodes(run / "metrics.jsonl", run / "episodes.png")
    if episodes is not None:
        print(episodes)
    return 0


def _study(args) -> int:
    load_config(args.config, args.overrides)  # fail now on a bad config, not at run 7
    out = Path(args.out or f"studies/{args.kind}")
    if args.kind == "rlhf":
        from asyncrl.study_rlhf import grid as rlhf_grid
        from asyncrl.study_rlhf import run_study

        settings = rlhf_grid([float(x) for x in args.kl_coef.split(",")],
                             [int(x) for x in args.rm_pairs.split(",")],
                             [int(x) for x in args.max_staleness.split(",")]
                             if args.max_staleness else None)
        _check_settings(args, settings)
        report = run_study(args.config, args.overrides, settings, args.seeds, out)
    else:
        from asyncrl.study import grid, run_sweep

        settings = grid([int(x) for x in (args.max_staleness or "0,1,2,4,8").split(",")],
                        args.correction.split(","))
        _check_settings(args, settings)
        report = run_sweep(args.config, args.overrides, settings, args.seeds, out, args.target)
    print(f"[study] report in {report}:")
    print((report / "summary.md").read_text())
    return 0


def _check_settings(args, settings) -> None:
    for s in settings:
        load_config(args.config, [*args.overrides, *s.overrides])


def _audit(args) -> int:
    from asyncrl.audit import delivery_audit

    try:
        audit = delivery_audit(Path(args.run_dir))
    except RuntimeError as e:  # a log another asyncrl version wrote: named, no traceback
        print(f"asyncrl audit: {e}", file=sys.stderr)
        return 1
    print(f"[audit] {audit.summary()}")
    return 0 if audit.ok else 1


def _keys(args) -> int:
    from asyncrl.transport import client_roles, make_keys

    n = args.generators
    if n is None:
        n = load_config(args.config).generator.num_generators if args.config else 1
    if not 1 <= n <= 4096:
        raise ConfigError(f"--generators {n}: must be in [1, 4096]")
    roles = client_roles(n)
    print(f"CURVE keys in {make_keys(Path(args.dir).expanduser(), roles)}: the servers' pair "
          f"and one pair per client role ({', '.join(roles)}); owner-only. Each role needs "
          "server.key and its own <role>.key_secret; the buffer and the learner (which serve) "
          "server.key_secret and every <role>.key. Set net.keys_dir to the directory")
    from asyncrl.transport import endpoint_key

    print(f"OpenAI-compatible endpoints (generator.endpoint): Authorization: Bearer "
          f"{endpoint_key(Path(args.dir).expanduser())}")
    return 0


def _replay(args) -> int:
    from asyncrl.learner.replay import replay

    return 0 if replay(Path(args.run_dir)) else 1


COMMANDS = {"run": _run, "prepare": _prepare, "train-rm": _train_rm, "reward": _reward_role,
            "buffer": _buffer, "generator": _generator,
            "evaluator": _evaluator,
            "learner": _learner, "plot": _plot, "study": _study, "audit": _audit,
            "keys": _keys, "replay": _replay}
