#!/usr/bin/env bash
# GPU acceptance check of segclip-d2: offline setup (wheels folder), CUDA op build, checks table.
#
#   tools/gpu_acceptance.sh --download-wheels DIR --python-version 3.12   # on a machine with PyPI
#   PYTHON=python3 tools/gpu_acceptance.sh --wheels DIR                   # on the GPU machine
#   tools/gpu_acceptance.sh --help
#
# Uses $PYTHON (default python3) and its CUDA torch; never creates a venv or reaches the network
# on the GPU machine. Exits 2 at once when no GPU is visible, 1 when a check fails. All logic is
# in tools/gpu_acceptance.py (tested on CPU-only machines for everything that needs no GPU).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
export PYTHON
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "gpu_acceptance: interpreter '$PYTHON' not found (set PYTHON=/path/to/python3)" >&2
    exit 2
fi
exec "$PYTHON" tools/gpu_acceptance.py "$@"
