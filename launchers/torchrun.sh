#!/usr/bin/env bash
# One node, several processes (GPUs, or CPU processes with gloo):
#   launchers/torchrun.sh 4 train --config configs/default.yaml name=weak train.regime=weak
#   launchers/torchrun.sh 4 bench --run runs/weak
# The first argument is the number of processes; the rest is an `fscs` command line.
set -euo pipefail
NPROC=${1:?usage: launchers/torchrun.sh NPROC fscs-subcommand [args...]}
shift
PY=${PYTHON:-python}
if [ -z "${OMP_NUM_THREADS:-}" ]; then
  CORES=$(nproc)
  export OMP_NUM_THREADS=$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))
fi
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m fscs "$@"
