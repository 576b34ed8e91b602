#!/usr/bin/env bash
# Wheels that benchmarks/gpu/run.sh needs on the lent GPU machine, which has Python 3.12, PyTorch, timm and
# tensorboard but no network and none of webdataset, omegaconf, submitit, deepspeed (+ pydantic).
# Run here (package registries reachable), in the repo root; it fills .whl/ (git-ignored via
# .git/info/exclude) for `carry: [".whl"]`. run.sh installs them into a scratch site dir with --no-deps.
#   bash benchmarks/gpu/fetch_wheels.sh          (env: PYVER=3.12, DEST=.whl)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
DEST="${DEST:-.whl}"
PYVER="${PYVER:-3.12}"
mkdir -p "$DEST"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# The project's pins where the device lacks the package (timm is pinned too: the backbone code reads its
# attention modules); then their dependencies that the device image does not hold.
PKGS=(webdataset==1.0.2 braceexpand omegaconf==2.3.0 timm==1.0.31 submitit==1.5.4 hjson
      pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection "typing_extensions>=4.16")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${PLAT[@]}" -d "$DEST" "${PKGS[@]}"
# sdist only on PyPI: pure-Python wheels built here work on any Python 3. DeepSpeed's setup.py imports torch
# (the project's .venv has it); DS_BUILD_OPS=0 builds no ops (they JIT-compile on first use, if ever).
python3 -m pip wheel -q --no-deps -w "$DEST" antlr4-python3-runtime==4.9.3
BUILD_PY="$REPO/.venv/bin/python"
[ -x "$BUILD_PY" ] || BUILD_PY=python3
DS_BUILD_OPS=0 "$BUILD_PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" deepspeed==0.19.8
ls -1 "$DEST"
du -sh "$DEST"
