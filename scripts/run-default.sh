#!/usr/bin/env bash
# Install (if needed) and run the embedded default: tiny Llama, SFT warm start, async GRPO.
# Extra arguments are config overrides, e.g.  scripts/run-default.sh learner.total_steps=50
set -euo pipefail
cd "$(dirname "$0")/.."
trackers=()  # run.trackers=[wandb,mlflow] among the overrides: install those too
for a in "$@"; do
  case "$a" in run.trackers=*) t=${a#run.trackers=}; t=${t//[\[\] ]/}; [ -n "$t" ] && trackers=(--trackers "$t") ;; esac
done
bash scripts/install.sh "${trackers[@]}"
exec .venv/bin/asyncrl run configs/default.yaml "$@"
