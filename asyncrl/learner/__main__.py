"""Entry point for torchrun: `torchrun ... -m asyncrl.learner --config RUN_DIR/config.yaml`."""

import argparse
import logging
import os
import sys
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m asyncrl.learner")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s learner[{rank}] %(name)s: %(message)s")
    from asyncrl.config import load_config
    from asyncrl.learner.main import run
    from asyncrl.runner import resolve_model

    cfg = load_config(args.config, args.overrides)
    if not cfg.run_dir:
        print("learner: run_dir must be set in the config", file=sys.stderr)
        return 2
    try:
        # A config straight from a ConfigMap (Kubernetes) still names a builtin model: build or
        # reuse it here, as `asyncrl run` and the Slurm script do before starting the ranks
        # (concurrent builds are safe: the first to finish is kept).
        resolve_model(cfg, lambda line: print(f"learner[{rank}]: {line}", flush=True))
        run(cfg, Path(cfg.run_dir))
    except (TimeoutError, FileNotFoundError, OSError) as e:
        # An unreachable peer or a missing file: one clear line, not a traceback per rank.
        print(f"learner[{rank}]: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
