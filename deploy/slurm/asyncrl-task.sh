#!/bin/bash
# One Slurm task of deploy/slurm/two-pool.sbatch: `asyncrl-task.sh buffer|generator|learner`.
# Reads what two-pool.sbatch exports: PY, ASYNCRL_CONFIG, and for the learner LEARNER_HOST,
# RDZV_PORT, RDZV_ID, LEARNER_NNODES, GPUS_PER_TRAIN_NODE; Slurm sets SLURM_PROCID and
# SLURMD_NODENAME.
set -euo pipefail
role=${1:?usage: asyncrl-task.sh buffer|generator|learner}
case "$role" in
  buffer)
    exec "$PY" -m asyncrl buffer --config "$ASYNCRL_CONFIG"
    ;;
  generator)
    # The step's task id is the generator index (one task per GPU).
    exec "$PY" -m asyncrl generator --config "$ASYNCRL_CONFIG" --index "$SLURM_PROCID"
    ;;
  learner)
    # --max-restarts: learner.max_restarts of the run's config (two-pool.sbatch exports it);
    # a failed rank restarts every rank, which resume from the last checkpoint
    # (docs/reliability.md). --local-addr: the node name, which both decides the node's rank order in the c10d
    # rendezvous (sorted) and is the address the others use if this node gets rank 0.
    exec "$PY" -m torch.distributed.run \
      --nnodes="$LEARNER_NNODES" --nproc-per-node="$GPUS_PER_TRAIN_NODE" --max-restarts="${LEARNER_MAX_RESTARTS:-0}" \
      --rdzv-backend=c10d --rdzv-endpoint="$LEARNER_HOST:$RDZV_PORT" --rdzv-id="$RDZV_ID" \
      --local-addr="$SLURMD_NODENAME" \
      -m asyncrl.learner --config "$ASYNCRL_CONFIG"
    ;;
  *)
    echo "asyncrl-task.sh: unknown role $role" >&2
    exit 2
    ;;
esac
