#!/usr/bin/env bash
# Compile segclip_d2._C with its CUDA kernels (sm_80 + sm_90) into a temporary directory, to
# catch CUDA compile errors on machines without a GPU. The in-place CPU build in the source
# tree is left untouched. Exits non-zero when the compilation fails.
#
#   tools/check_cuda_build.sh            # uses .venv/bin/python (or $PYTHON)
#   KEEP_BUILD=1 tools/check_cuda_build.sh   # keep the temporary directory
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/segclip_cuda_build.XXXXXX")"
cleanup() {
  if [[ "${KEEP_BUILD:-0}" == "1" ]]; then
    echo "build kept in $TMP"
  else
    rm -rf "$TMP"
  fi
}
trap cleanup EXIT

export FORCE_CUDA=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"

echo "check_cuda_build: TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, build dir $TMP"
start=$(date +%s)
cd "$ROOT"
# build_ext without --inplace: objects and the .so go to $TMP only.
"$PYTHON" setup.py -q build_ext --build-temp "$TMP/temp" --build-lib "$TMP/lib"

so=$(find "$TMP/lib" -name '_C*.so' | head -n 1)
if [[ -z "$so" ]]; then
  echo "check_cuda_build: FAILED, no extension produced" >&2
  exit 1
fi
# The CUDA kernels must be in the library, for every requested architecture.
if "$PYTHON" - "$so" <<'PY'
import sys
data = open(sys.argv[1], "rb").read()
sys.exit(0 if b"ms_deform_attn_forward_cuda" in data else 1)
PY
then
  :
else
  echo "check_cuda_build: FAILED, $so has no CUDA kernels (WITH_CUDA not defined?)" >&2
  exit 1
fi
cuobjdump=""
for d in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-*; do
  if [[ -n "$d" && -x "$d/bin/cuobjdump" ]]; then
    cuobjdump="$d/bin/cuobjdump"
    break
  fi
done
if [[ -n "$cuobjdump" ]]; then
  archs=$("$cuobjdump" --list-elf "$so" 2>/dev/null | grep -o 'sm_[0-9]*' | sort -u | tr '\n' ' ')
  echo "check_cuda_build: device code for: ${archs:-none}"
  IFS=';' read -ra wanted <<< "$TORCH_CUDA_ARCH_LIST"
  for a in "${wanted[@]}"; do
    sm="sm_${a//./}"
    sm="${sm%+PTX}"
    if [[ " $archs " != *" $sm "* ]]; then
      echo "check_cuda_build: FAILED, no device code for $sm in $so" >&2
      exit 1
    fi
  done
else
  echo "check_cuda_build: cuobjdump not found, architectures not listed"
fi
echo "check_cuda_build: OK ($so, $(( $(date +%s) - start )) s)"
