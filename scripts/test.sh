#!/usr/bin/env bash
# Install (if needed) and run the test suite: unit tests and the end-to-end tests with the real
# vLLM engine, real ZeroMQ sockets and real torchrun. Slow runs (-m slow) are left to .ci/run.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --trackers tensorboard,wandb,mlflow  # read back by the tests
# promtool and prometheus (Debian's `prometheus` package) for tests/unit/test_promtool.py and
# tests/e2e/test_prometheus_scrape.py; without them those tests skip (and fail under CI=true).
# The package may try to start its service; that is harmless and not needed by the tests.
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing Debian's prometheus package (promtool, prometheus) for the tests..."
    (export DEBIAN_FRONTEND=noninteractive
     apt-get update -qq && apt-get install -y -qq prometheus >/dev/null) ||
      echo "warning: could not install the prometheus package; its tests will skip (and fail under CI)" >&2
  else
    echo "note: promtool/prometheus not found and not root: the Prometheus tests will skip" \
         "(install Debian's prometheus package to run them)" >&2
  fi
fi
exec .venv/bin/python -m pytest -m "not slow and not gpu" "$@"
