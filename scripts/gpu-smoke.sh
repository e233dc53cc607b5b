#!/usr/bin/env bash
# The first thing to run on a machine with GPUs: does asyncrl's GPU path work here?
#
#   scripts/gpu-smoke.sh [key=value ...]        # e.g. model.dtype=float32
#
# Installs the GPU stack into ./.venv-gpu (vllm 0.32.0 from PyPI with the CUDA torch it pins,
# then this package), builds the tiny built-in model, and runs the whole loop for a few
# minutes on the GPUs it sees: with one GPU colocated (learner and one generator on GPU 0,
# weights by CUDA IPC), with two or more one generator and one learner rank on GPUs of their
# own (weights by NCCL). bf16 weights with float32 master weights, CUDA graphs on. Then it
# prints one line each: devices used, steps done, sync seconds vs a raw NCCL/IPC copy of the
# same bytes, the sync probe's max |diff| against the learner, generated tok/s, and PASS or
# FAIL (the exit status too). Everything it writes is under ./.venv-gpu and ./runs/gpu-smoke-*.
# Budget: about 3-5 minutes to install on a fast link, 2-3 minutes to run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ASYNCRL_GPU_VENV:-.venv-gpu}
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu-smoke: no NVIDIA GPU visible (nvidia-smi -L failed); this script is for GPU hosts" >&2
  echo "FAIL"
  exit 1
fi
nvidia-smi -L
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
if [ ! -f "$VENV/.asyncrl-gpu-stack" ]; then
  echo "gpu-smoke: installing vllm 0.32.0 and its CUDA torch into $VENV (a few minutes)..."
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "vllm==0.32.0"
  touch "$VENV/.asyncrl-gpu-stack"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[gpu,dev]"
"$VENV/bin/python" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA'; \
print(f'gpu-smoke: torch {torch.__version__}, CUDA {torch.version.cuda}, '
      f'{torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}')"

RUN_DIR=${RUN_DIR:-runs/gpu-smoke-$(date +%Y%m%d-%H%M%S)}
start=$(date +%s)
set +e
timeout 900 "$VENV/bin/asyncrl" run configs/gpu-smoke.yaml "run_dir=$RUN_DIR" "$@"
code=$?
set -e
echo "gpu-smoke: run ended with code $code after $(( $(date +%s) - start ))s; logs in $RUN_DIR/logs"
if [ "$code" != 0 ]; then
  for f in "$RUN_DIR"/logs/*.log; do echo "--- last lines of $f"; tail -n 15 "$f"; done
fi
"$VENV/bin/python" scripts/gpu_smoke.py "$RUN_DIR"
