#!/usr/bin/env bash
# Install (if needed) and run the embedded default: tiny Llama, SFT warm start, async GRPO.
# Extra arguments are config overrides, e.g.  scripts/run-default.sh learner.total_steps=50
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/asyncrl run configs/default.yaml "$@"
