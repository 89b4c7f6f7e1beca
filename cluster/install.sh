#!/usr/bin/env bash
# Installs the pinned umask-trainer stack into a virtualenv, in the one order that works.
#
# Used by `make setup` on a laptop or CI and by cluster node images, so that every machine
# gets the same versions. Idempotent: a finished install leaves a stamp and is skipped.
#
#   cluster/install.sh [VENV_DIR]          (default .venv)
#   UMASK_ACCEL=cuda cluster/install.sh    force the CUDA fbgemm build (default: auto-detect)
#   UMASK_KERNELS=0 cluster/install.sh     skip the optional triton extra
#
# Why the order matters:
# - torch is pinned first: a bare `torch` requirement would pull a multi-GB CUDA build.
# - torchrec's metadata requires `fbgemm-gpu`, which would replace the CPU build with a CUDA
#   one of another version and break at import; torchrec goes in with --no-deps and its real
#   dependencies are listed in pyproject.toml.
# - deepspeed ships an sdist whose build imports torch: build it against the pinned torch
#   (--no-build-isolation) with no C++ op prebuilt (DS_BUILD_OPS=0): training needs none, and
#   trainer/training/native_ops.py refuses any op DeepSpeed would JIT-build on a worker.
set -euo pipefail

VENV=${1:-.venv}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3.11}
TORCH_VERSION=2.13.0
FBGEMM_VERSION=1.8.0
TORCHREC_VERSION=1.8.0
STAMP="$VENV/.umask-installed"
FINGERPRINT=$(cat "$ROOT/pyproject.toml" "$0" | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$FINGERPRINT" ]; then
  exit 0
fi

if [ -z "${UMASK_ACCEL:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    UMASK_ACCEL=cuda
  else
    UMASK_ACCEL=cpu
  fi
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH_VERSION" >"$CONSTRAINTS"

$PIP install -q --upgrade pip setuptools wheel
if [ "$UMASK_ACCEL" = cuda ]; then
  $PIP install -q "torch==$TORCH_VERSION" "fbgemm-gpu==$FBGEMM_VERSION"
else
  $PIP install -q "torch==$TORCH_VERSION" "fbgemm-gpu-cpu==$FBGEMM_VERSION"
fi
$PIP install -q --no-deps "torchrec==$TORCHREC_VERSION"
DS_BUILD_OPS=0 $PIP install -q -c "$CONSTRAINTS" --no-build-isolation "deepspeed>=0.19.8,<0.20"
EXTRAS=dev
[ "${UMASK_KERNELS:-1}" = 1 ] && EXTRAS=dev,kernels
$PIP install -q -c "$CONSTRAINTS" -e "$ROOT[$EXTRAS]"
"$VENV/bin/python" -c "import torch, torchrec, deepspeed, ray, pyarrow, omegaconf" 2>/dev/null \
  || { echo "install.sh: the stack installed but does not import; see the error above" >&2;
       "$VENV/bin/python" -c "import torch, torchrec, deepspeed, ray, pyarrow, omegaconf"; exit 1; }
echo "$FINGERPRINT" >"$STAMP"
echo "install.sh: $VENV ready ($UMASK_ACCEL)"
