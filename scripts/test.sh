#!/usr/bin/env bash
# Install (if needed) and run the test suite: unit tests and the end-to-end tests with the real
# vLLM engine, real ZeroMQ sockets and real torchrun. Slow runs (-m slow) are left to .ci/run.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m pytest -m "not slow and not gpu" "$@"
