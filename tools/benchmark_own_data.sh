#!/usr/bin/env bash
# The own-data path end to end, each step timed: sample 4-band scenes and a GeoPackage of
# polygons (datasets/make_sample_scenes.py), prepare_custom, train the CPU model
# (configs/custom/segclip_cpu.yaml), evaluate, predict a 4-band scene, export a 4-channel ONNX
# and predict with it. Prints one line per step with its seconds, then the CPU.
#
#   bash tools/benchmark_own_data.sh WORK_DIR [SCENES SIZE MAX_ITER]   # defaults 4 2048 300
#
# WORK_DIR must not exist (nothing is overwritten). Uses .venv/bin/python when present.
set -euo pipefail

work=${1:?usage: bash tools/benchmark_own_data.sh WORK_DIR [SCENES SIZE MAX_ITER]}
scenes=${2:-4}
size=${3:-2048}
iters=${4:-300}
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$repo/.venv/bin/python}
[ -x "$py" ] || py=python3
if [ -e "$work" ]; then
    echo "error: $work: already exists; choose a new WORK_DIR (nothing is overwritten)" >&2
    exit 2
fi
mkdir -p "$work"
work=$(cd "$work" && pwd)
export DETECTRON2_DATASETS="$work/datasets" HF_HUB_OFFLINE=1
mkdir -p "$DETECTRON2_DATASETS"
log="$work/steps.log"
out="$work/train"
weights="$out/model_final.pth"
scene="$work/samples/scenes/scene_0.tif"

step() {  # step NAME COMMAND...: run it, its output to steps.log, and print its time
    local name=$1
    shift
    local t0
    t0=$(date +%s.%N)
    if ! "$@" >>"$log" 2>&1; then
        echo "error: step '$name' failed; see $log" >&2
        exit 1
    fi
    printf '%-9s %8.1f s\n' "$name" "$(echo "$(date +%s.%N) - $t0" | bc)"
}

cd "$repo"
step samples "$py" datasets/make_sample_scenes.py --dst "$work/samples" --scenes "$scenes" \
    --size "$size"
step prepare "$py" datasets/prepare_custom.py --images "$work/samples/scenes" \
    --labels "$work/samples/labels.gpkg" --classes "$work/samples/classes.yaml" \
    --name samples --dst "$DETECTRON2_DATASETS"
step train "$py" train_net.py --config-file configs/custom/segclip_cpu.yaml \
    DATASETS.CUSTOM samples SOLVER.MAX_ITER "$iters" OUTPUT_DIR "$out"
step evaluate "$py" train_net.py --config-file configs/custom/segclip_cpu.yaml --eval-only \
    DATASETS.CUSTOM samples MODEL.WEIGHTS "$weights" OUTPUT_DIR "$work/eval"
step demo "$py" demo/demo.py --config-file "$out/config.yaml" --input "$scene" \
    --output "$work/pred" --no-progress --opts MODEL.WEIGHTS "$weights"
step export "$py" tools/export_onnx.py --config-file "$out/config.yaml" --weights "$weights" \
    --tile-size 512 --output "$work/samples.onnx" --verify-image "$scene"
step onnx_demo "$py" demo/demo.py --onnx "$work/samples.onnx" --input "$scene" \
    --output "$work/pred_onnx" --no-progress

grep -h "mIoU = \|round trip\|Deepness tiling\|exported \|resolution: " "$log" | sed 's/^.*\]: //' || true
"$py" - "$work" <<'EOF'
import sys
import numpy as np
import rasterio

work = sys.argv[1]
with rasterio.open(f"{work}/pred/scene_0_pred.tif") as a, \
        rasterio.open(f"{work}/pred_onnx/scene_0_pred.tif") as b:
    pa, pb = a.read(1), b.read(1)
    print(f"demo vs demo --onnx, class maps of scene_0 ({a.width}x{a.height} px, "
          f"{a.crs}): {100 * (pa == pb).mean():.2f}% of pixels agree")
EOF
echo "CPU: $(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2 | xargs), $(getconf _NPROCESSORS_ONLN) cores"
