#!/usr/bin/env bash
# One node, several processes (GPUs, or CPU processes with gloo):
#   launchers/torchrun.sh 4 train --config configs/default.yaml name=weak train.regime=weak
#   launchers/torchrun.sh 4 bench --run-dir runs/weak
# The first argument is the number of processes; the rest is an `fscs` command line.
set -euo pipefail
NPROC=${1:?usage: launchers/torchrun.sh NPROC fscs-subcommand [args...]}
shift
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
  echo "launchers/torchrun.sh: NPROC must be a number of processes >= 1, got '$NPROC'" \
       "(usage: launchers/torchrun.sh NPROC fscs-subcommand [args...])" >&2
  exit 2
fi
# Python: $PYTHON, else this checkout's .venv (what `make demo` / `make test` build), else python on PATH.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"
else PY=python; fi
# found, not imported (torchrun imports them anyway): a missing package is a one-line error, not a traceback
if ! "$PY" -c 'import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ("torch", "fscs")))' 2>/dev/null; then
  echo "launchers/torchrun.sh: '$PY' cannot import torch and fscs; run 'make test' (builds .venv) or set PYTHON" >&2
  exit 2
fi
if [ -z "${OMP_NUM_THREADS:-}" ]; then
  CORES=$(nproc)
  export OMP_NUM_THREADS=$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))
fi
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m fscs "$@"
