"""The `asyncrl` command.

    asyncrl run CONFIG [key=value ...]       everything: prepare the model, start all roles
    asyncrl prepare CONFIG [key=value ...]   build the embedded default model (SFT) only
    asyncrl buffer --config CONFIG           one role, e.g. on its own host
    asyncrl generator --config CONFIG --index I
    asyncrl learner --config CONFIG          wraps torchrun --nproc-per-node learner.nproc
    asyncrl plot RUN_DIR                     redraw RUN_DIR/curves.png from metrics.jsonl
    asyncrl replay RUN_DIR                   re-train on the logged batches, compare weights
    asyncrl study staleness ... CONFIG       a grid of runs over staleness and correction
    asyncrl keys DIR                         make a run's CURVE keys (roles started on their own)
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
import time
from pathlib import Path

from asyncrl.config import ConfigError, RunConfig, load_config, save_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asyncrl", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, helptext in (("run", "prepare the model and run every role"),
                           ("prepare", "build the embedded default model only")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("config", help="YAML file in configs/ (e.g. configs/default.yaml)")
        s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. learner.lr=1e-4")
    for name in ("buffer", "generator", "learner"):
        s = sub.add_parser(name, help=f"run the {name} role alone")
        s.add_argument("--config", required=True)
        s.add_argument("overrides", nargs="*")
        if name == "generator":
            s.add_argument("--index", type=int, default=0)
    s = sub.add_parser("plot", help="redraw RUN_DIR/curves.png")
    s.add_argument("run_dir")
    s = sub.add_parser("study", help="a grid of runs and a report (staleness sweep)")
    s.add_argument("kind", choices=["staleness"])
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    s.add_argument("--max-staleness", default="0,1,2,4,8", help="comma-separated bounds")
    s.add_argument("--correction", default="none,tis,decoupled",
                   help="comma-separated learner.offpolicy values")
    s.add_argument("--seeds", type=int, default=1)
    s.add_argument("--target", type=float, default=0.8,
                   help="accuracy for the time-to-target column")
    s.add_argument("--out", default="studies/staleness", help="sweep directory (resumable)")
    s = sub.add_parser("audit", help="check from RUN_DIR alone that every group the buffer "
                                     "acknowledged was trained once, dropped as stale or held")
    s.add_argument("run_dir")
    s = sub.add_parser("keys", help="make the CURVE key pairs for roles started on their own "
                                    "(give every role this directory as net.keys_dir)")
    s.add_argument("dir")
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
        if args.cmd == "plot":
            from asyncrl.plots import plot_run

            print(plot_run(Path(args.run_dir) / "metrics.jsonl", Path(args.run_dir) / "curves.png"))
            return 0
        if args.cmd == "audit":
            from asyncrl.audit import delivery_audit

            audit = delivery_audit(Path(args.run_dir))
            print(f"[audit] {audit.summary()}")
            return 0 if audit.ok else 1
        if args.cmd == "keys":
            from asyncrl.transport import make_keys

            print(f"CURVE keys in {make_keys(Path(args.dir).expanduser())} (owner-only; copy "
                  "the directory to every host of the run and set net.keys_dir to it)")
            return 0
        if args.cmd == "study":
            return _cmd_study(args)
        if args.cmd == "replay":
            from asyncrl.learner.replay import replay

            return 0 if replay(Path(args.run_dir)) else 1
        cfg = load_config(args.config, args.overrides)
        return _COMMANDS[args.cmd](cfg, args)
    except ConfigError as e:
        print(f"asyncrl: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, TimeoutError, OSError, ValueError) as e:
        print(f"asyncrl {args.cmd}: {e}", file=sys.stderr)
        return 1


def resolve_model(cfg: RunConfig, progress=print) -> RunConfig:
    """Replace a builtin model path by the built directory (building it once, cached)."""
    if cfg.model.path.startswith("builtin:"):
        from asyncrl.task.tiny_model import prepare_builtin

        cfg.model.path = str(prepare_builtin(cfg, progress))
    return cfg


def _run_dir(cfg: RunConfig) -> Path:
    if not cfg.run_dir:
        cfg.run_dir = str(Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    path = Path(cfg.run_dir).resolve()
    cfg.run_dir = str(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cmd_prepare(cfg: RunConfig, args) -> int:
    print(resolve_model(cfg).model.path)
    return 0


def _cmd_run(cfg: RunConfig, args) -> int:
    return execute_run(cfg)


def execute_run(cfg: RunConfig, out=print) -> int:
    """Prepare the model, write RUN_DIR/config.yaml, run every role until the learner ends."""
    from asyncrl.launcher import launch

    run_dir = _run_dir(cfg)
    if (run_dir / "metrics.jsonl").exists():
        raise ConfigError(f"run_dir {run_dir} already holds a run (metrics.jsonl); "
                          "choose another run_dir")
    out(f"[run] run directory {run_dir}")
    if cfg.net.curve and not cfg.net.keys_dir:
        from asyncrl.transport import make_keys

        make_keys(run_dir / "keys")  # every role of this run finds them in RUN_DIR/keys
    elif cfg.net.curve:
        from asyncrl.transport import load_keys

        load_keys(Path(cfg.net.keys_dir).expanduser())  # missing keys: fail now, naming them
    resolve_model(cfg, out)
    from asyncrl import devices

    out(f"[run] {devices.apply(cfg, devices.visible_gpus()).describe()}")
    config_path = run_dir / "config.yaml"
    save_config(cfg, config_path)
    code = launch(cfg, run_dir, config_path, out)
    _summary(run_dir, out)
    return code


def _cmd_study(args) -> int:
    from asyncrl.study import grid, run_sweep

    load_config(args.config, args.overrides)  # fail now on a bad config, not at run 7
    settings = grid([int(x) for x in args.max_staleness.split(",")],
                    args.correction.split(","))
    for s in settings:
        load_config(args.config, [*args.overrides, *s.overrides])
    report = run_sweep(args.config, args.overrides, settings, args.seeds, Path(args.out),
                       args.target)
    print(f"[study] report in {report}:")
    print((report / "summary.md").read_text())
    return 0


def _summary(run_dir: Path, out=print) -> None:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    evals = [r for r in map(json.loads, path.read_text().splitlines()) if "eval_accuracy" in r]
    if len(evals) >= 2:
        a0, a1 = evals[0]["eval_accuracy"], evals[-1]["eval_accuracy"]
        out(f"[run] held-out accuracy: SFT {a0:.1%} -> step {evals[-1]['step']} {a1:.1%} "
            f"({(a1 - a0) * 100:+.1f} points)")
    if (run_dir / "curves.png").exists():
        out(f"[run] plot: {run_dir / 'curves.png'}")


def _role_run_dir(cfg: RunConfig) -> Path:
    if not cfg.run_dir:
        raise ConfigError("run_dir must be set when a role is started on its own")
    path = Path(cfg.run_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cmd_buffer(cfg: RunConfig, args) -> int:
    from asyncrl.buffer.main import run

    resolve_model(cfg)
    if cfg.buffer.durable:
        _role_run_dir(cfg)  # the durable log lives in RUN_DIR/buffer/
    vocab = json.loads((Path(cfg.model.path) / "config.json").read_text()).get("vocab_size")
    run(cfg, vocab_size=vocab)
    return 0


def _cmd_generator(cfg: RunConfig, args) -> int:
    from asyncrl.generator.main import run

    if not 0 <= args.index < cfg.generator.num_generators:
        raise ConfigError(f"--index {args.index} outside generator.num_generators="
                          f"{cfg.generator.num_generators}")
    if cfg.generator.device_ids:  # before vLLM (and CUDA) is imported
        tp = cfg.generator.tensor_parallel_size
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(
            map(str, cfg.generator.device_ids[args.index * tp : (args.index + 1) * tp]))
    resolve_model(cfg)
    run(cfg, args.index, cfg.model.path, _role_run_dir(cfg))
    return 0


def _cmd_learner(cfg: RunConfig, args) -> int:
    import signal
    import subprocess

    from asyncrl.launcher import learner_command, role_env

    resolve_model(cfg)
    run_dir = _role_run_dir(cfg)
    path = run_dir / "config.yaml"
    save_config(cfg, path)
    # Pass torchrun's output through, and end a failure with the ranks' own one-line errors
    # rather than torchrun's ChildFailedError traceback.
    proc = subprocess.Popen(learner_command(cfg, path), env=role_env(cfg, "learner", dict(
        os.environ)), stderr=subprocess.PIPE, text=True, bufsize=1)
    # Ctrl-C / SIGTERM go to torchrun, which stops its workers; we keep reading until it exits.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _f: proc.send_signal(s))
    errors = []
    for line in proc.stderr:
        sys.stderr.write(line)
        if line.startswith("learner[") and "]: " in line:
            errors.append(line.strip())
    code = proc.wait()
    if code != 0:
        print(f"asyncrl learner: {errors[0] if errors else f'torchrun exited with code {code}'}",
              file=sys.stderr)
    return code


_COMMANDS = {"run": _cmd_run, "prepare": _cmd_prepare, "buffer": _cmd_buffer,
             "generator": _cmd_generator, "learner": _cmd_learner}
