#!/usr/bin/env bash
# One prepared GPU check for issue 7: under 8 minutes on one GPU, no network; the only install is of the wheels
# carried in .whl/ (benchmarks/gpu/fetch_wheels.sh, run where pip works) into a scratch site dir.
#   1. pytest -m gpu                      (tests/gpu: bf16 fwd/bwd, CUDA head == CPU head, fused == unfused q/k,
#                                          the head in DDP over a 1-rank NCCL group in bf16)
#   2. a short bf16 training under torchrun (1 GPU = 1 process: the trainer's CUDA path; DDP is step 1's)
#   3. a short DeepSpeed training step   (skipped with a message when train.engine=deepspeed is not accepted)
#   4. perf benchmarks eq, 1, 3, 7 on CUDA (benchmarks/perf/run.py --device cuda)
# Prints a status table and the benchmark tables (Markdown) to paste into benchmarks/perf/RESULTS.md.
# Usage: bash benchmarks/gpu/run.sh   env: LOGDIR=dir for logs, runs and shards (default a fresh /tmp dir);
#        RESULTS_DIR=dir that receives only gpu-check.md + status.tsv + the logs of failed steps (<= 8 files);
#        BUDGET_S=total seconds (default 420); PY=python; FSCS_COMMIT=commit to record (the copy may lack .git).
# On the lent device: run(command="RESULTS_DIR=$OUT FSCS_COMMIT=<sha> bash benchmarks/gpu/run.sh",
#                         carry=[".whl"], timeout_s=500)   (the script stops itself inside BUDGET_S)
set -u -o pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
LOGDIR="${LOGDIR:-$(mktemp -d /tmp/fscs-gpu-XXXXXX)}"
mkdir -p "$LOGDIR"
BUDGET_S="${BUDGET_S:-420}"          # everything below must finish inside this (8 min minus start-up slack)
START=$(date +%s)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export DS_BUILD_OPS=0 DS_SKIP_CUDA_CHECK=1   # DeepSpeed: no ahead-of-time op builds (on CUDA with the torch
                                             # optimizer, bf16 and ZeRO 0 it loads no op at run time either)

# early_exit MESSAGE: a failure before the steps still leaves a status and the logs in RESULTS_DIR
early_exit() {
  echo "$1" >&2
  if [ -n "${RESULTS_DIR:-}" ]; then
    mkdir -p "$RESULTS_DIR"
    printf 'setup\tFAILED: %s\t0\n' "$1" > "$RESULTS_DIR/status.tsv"
    for f in wheels.log preflight.log; do [ -f "$LOGDIR/$f" ] && cp "$LOGDIR/$f" "$RESULTS_DIR/"; done
  fi
  exit 2
}
if [ -z "${PY:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; else PY="$(command -v python3 || command -v python)"; fi
fi
# Wheels carried to a machine without network (benchmarks/gpu/fetch_wheels.sh -> .whl/): a scratch site dir
# first on the path, so they shadow older copies in the machine's image (--no-deps: the image has the rest).
if ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
  SITE="${SITE:-/tmp/fscs-site}"
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$REPO"/.whl/*.whl > "$LOGDIR/wheels.log" 2>&1; then
    early_exit "installing the carried wheels in .whl/ failed: $(tail -n 1 "$LOGDIR/wheels.log")"
  fi
  export PYTHONPATH="$SITE:$PYTHONPATH"
fi
if ! timeout 120 "$PY" -c 'import webdataset, omegaconf, timm, torch.utils.tensorboard, fscs.train' \
    > "$LOGDIR/preflight.log" 2>&1; then
  early_exit "$PY cannot import the project ($(tail -n 1 "$LOGDIR/preflight.log")); on a machine without network \
run benchmarks/gpu/fetch_wheels.sh where pip works and carry .whl/"
fi
STATUS="$LOGDIR/status.tsv"
: > "$STATUS"

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# run_step NAME CAP_SECONDS CMD...: runs CMD with a timeout of min(CAP, time left), logs to $LOGDIR/NAME.log
run_step() {
  local name="$1" cap="$2"; shift 2
  local t; t=$(left)
  [ "$t" -gt "$cap" ] && t="$cap"
  if [ "$t" -lt 15 ]; then
    printf '%s\tskipped (time budget spent)\t0\n' "$name" >> "$STATUS"; return 0
  fi
  echo "=== $name (timeout ${t}s): $*"
  local s0 rc; s0=$(date +%s)
  timeout --kill-after=10 "$t" "$@" > "$LOGDIR/$name.log" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - s0 ))
  local verdict="ok"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then verdict="TIMEOUT after ${t}s"
  elif [ "$rc" -ne 0 ]; then verdict="FAILED (exit $rc)"; fi
  printf '%s\t%s\t%s\n' "$name" "$verdict" "$dt" >> "$STATUS"
  tail -n 5 "$LOGDIR/$name.log" | sed 's/^/    /'
  return 0
}

skip_step() { printf '%s\tskipped: %s\t0\n' "$1" "$2" >> "$STATUS"; echo "=== $1 skipped: $2"; }

echo "repo $REPO, python $PY, out $LOGDIR, budget ${BUDGET_S}s"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if ! timeout 60 "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  early_exit "no CUDA device visible to $PY (or torch missing): nothing to check here"
fi
timeout 60 "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'

# shards: the config default if present, else a small synthetic set (no network needed)
SHARDS="$REPO/data/synthetic-5i"
if [ ! -f "$SHARDS/index.json" ]; then
  SHARDS="$LOGDIR/shards"
  run_step shards 120 "$PY" -m fscs shards synth --out "$SHARDS" --num-images 600 --workers 4
fi

run_step pytest_gpu 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/gpu

COMMON=(data.shards="$SHARDS" out_dir="$LOGDIR/runs" train.device=cuda train.precision=bf16 train.epochs=1
        train.steps_per_epoch=20 train.log_every=5 data.num_workers=2)
run_step train_bf16_cuda 150 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m fscs train \
  name=gpu-bf16 train.engine=ddp "${COMMON[@]}"

if ! timeout 60 "$PY" -c 'import deepspeed' >/dev/null 2>&1; then
  skip_step deepspeed_step "deepspeed is not importable"
elif ! timeout 60 "$PY" -c "from fscs.config import load_config; load_config(None, ['train.engine=deepspeed'])" \
    > "$LOGDIR/deepspeed_probe.log" 2>&1; then
  skip_step deepspeed_step "train.engine=deepspeed not accepted: $(tail -n 1 "$LOGDIR/deepspeed_probe.log")"
else
  run_step deepspeed_step 150 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m fscs train \
    name=gpu-deepspeed train.engine=deepspeed "${COMMON[@]}" train.steps_per_epoch=5
fi

run_step perf_benchmarks 330 "$PY" benchmarks/perf/run.py --device cuda --only eq,1,3,7 --shards "$SHARDS" \
  --out "$LOGDIR/RESULTS-cuda.md"

SUMMARY="$LOGDIR/gpu-check.md"
{
  echo "## GPU check ($(date -Is), $(( $(date +%s) - START ))s in all)"
  echo
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  timeout 30 "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__)' 2>/dev/null
  echo
  echo "| step | result | seconds |"
  echo "|---|---|---|"
  while IFS=$'\t' read -r name verdict secs; do echo "| $name | $verdict | $secs |"; done < "$STATUS"
  echo
  if [ -f "$LOGDIR/RESULTS-cuda.md" ]; then cat "$LOGDIR/RESULTS-cuda.md"; fi  # partial if a step timed out
} > "$SUMMARY"
echo
cat "$SUMMARY"
echo "logs: $LOGDIR"
if [ -n "${RESULTS_DIR:-}" ]; then  # a few files only: a device tool may bring back at most 8
  mkdir -p "$RESULTS_DIR"
  cp "$SUMMARY" "$STATUS" "$RESULTS_DIR/"
  grep -e FAILED -e TIMEOUT -e 'skipped (time' "$STATUS" | cut -f1 | head -n 6 | while read -r name; do
    cp "$LOGDIR/$name.log" "$RESULTS_DIR/" 2>/dev/null || true
  done
fi
if grep -q -e FAILED -e TIMEOUT -e 'skipped (time' "$STATUS"; then exit 1; fi  # no tables = no success
exit 0
