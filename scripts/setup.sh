#!/usr/bin/env bash
# Create .venv with everything segclip-d2 needs, and build its compiled op.
#
# Idempotent: a second run checks a stamp and the imports and exits in seconds. An interrupted run
# leaves no stamp, so the next run redoes the (themselves idempotent) install steps.
#
# Environment knobs:
#   PYTHON=python3.11          interpreter that creates the venv (>= 3.10)
#   VENV=.venv                 where the environment goes
#   TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
#                              torch packages to install (e.g. a CPU-only or another CUDA build)
#   SEGCLIP_DETECTRON2=PATH|SPEC
#                              a detectron2 checkout or pip spec to install instead of searching
#   SEGCLIP_OFFLINE=1          do not try to reach the official detectron2 repository
#   FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0"
#                              build the CUDA kernel even where no GPU is visible
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
PY="$VENV/bin/python"
STAMP="$VENV/.segclip_setup_stamp"

say() { printf '[setup] %s\n' "$*"; }

# The stamp covers everything that changes what gets installed or compiled.
stamp_inputs() {
    {
        echo "$TORCH_SPEC|${SEGCLIP_DETECTRON2:-}|${FORCE_CUDA:-}|${TORCH_CUDA_ARCH_LIST:-}"
        cat pyproject.toml setup.py scripts/setup.sh tools/install_detectron2.py 2>/dev/null
        find segclip_d2/layers/csrc -type f 2>/dev/null | sort | xargs -r cat
    } | sha256sum | cut -d' ' -f1
}

environment_works() {
    "$PY" - <<'EOF' >/dev/null 2>&1
import detectron2, fvcore, open_clip, cv2, pycocotools, scipy, pytest  # noqa: F401
import segclip_d2
import segclip_d2._C  # the compiled deformable-attention op
EOF
}

want=$(stamp_inputs)
if [ -x "$PY" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && environment_works; then
    say "environment in $VENV is up to date"
    exit 0
fi

start=$(date +%s)
"$PYTHON" - <<'EOF' || { echo "[setup] Python >= 3.10 is required (set PYTHON=...)" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 10) else 1)
EOF
if [ ! -x "$PY" ]; then
    say "creating $VENV with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$VENV"
fi
rm -f "$STAMP"
"$PY" -m pip install --quiet --upgrade pip setuptools wheel

say "installing $TORCH_SPEC"
# shellcheck disable=SC2086
"$PY" -m pip install --quiet $TORCH_SPEC

say "installing detectron2"
"$PY" tools/install_detectron2.py

# CUDA build environment: torch guesses CUDA_HOME from the folder of the first nvcc on PATH, which
# may be a wrapper script; name the toolkit root, and add the cuSPARSE headers that torch's CUDA
# headers include and that the venv's nvidia packages carry.
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
    probe=$(mktemp -d)
    : >"$probe/probe.cu"
    top=$(cd "$probe" && nvcc --dryrun -c probe.cu 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
    rm -rf "$probe"
    if [ -n "$top" ] && [ -d "$top" ]; then
        CUDA_HOME=$(cd "$top" && pwd -P)
        export CUDA_HOME
    fi
fi
nv_inc=$("$PY" -c 'import pathlib, site; print(next((str(p) for s in site.getsitepackages() for p in [pathlib.Path(s, "nvidia", "cu13", "include")] if p.is_dir()), ""))')
if [ -n "$nv_inc" ]; then
    export CPATH="${CPATH:+$CPATH:}$nv_inc"
fi

say "installing segclip-d2 (editable) and building its compiled op"
"$PY" -m pip install --quiet --no-build-isolation -e ".[test]"

if ! environment_works; then
    say "the environment does not import cleanly; details:"
    "$PY" -c "import detectron2, segclip_d2, segclip_d2._C"
    exit 1
fi
echo "$want" >"$STAMP"
say "done in $(( $(date +%s) - start )) s; venv size $(du -sh "$VENV" | cut -f1)"
