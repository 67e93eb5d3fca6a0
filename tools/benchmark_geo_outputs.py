#!/usr/bin/env python
"""Memory and time of the demo's output pipeline (block reading, probabilities, confidence, COG
conversion, polygons) on synthetic GeoTIFFs of growing size, with a cheap stand-in model so the
figures isolate the pipeline (a real model adds a per-block cost that does not grow with the
raster). Each case runs in its own child process; peak RSS is that child's ``ru_maxrss`` and
``CPU s`` its user + system time (includes imports; steadier than wall time on busy cores).

    python tools/benchmark_geo_outputs.py --sizes 2048 8192 --variants all all-nocog class

For the real model use ``tools/benchmark_geotiff.py --variants ...``.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

VARIANTS = {
    "class": dict(cog=False),
    "class-cog": dict(cog=True),
    "all": dict(cog=True, probabilities="uint8", confidence=True, vector="gpkg"),
    "all-nocog": dict(cog=False, probabilities="uint8", confidence=True, vector="gpkg"),
}


def case(args) -> None:
    import rasterio
    import torch
    from benchmark_seams import stand_in

    from segclip_d2.data.dataset_facts import get_facts
    from segclip_d2.geo.outputs import OutputOptions, predict_to_outputs
    from segclip_d2.predict import SegInferencer
    from segclip_d2.predict.blocks import ClassPredictor, block_probs
    from segclip_d2.raster.sources import open_source

    torch.set_num_threads(args.threads)
    facts = get_facts("loveda")
    opts = OutputOptions(
        list(facts.classes),
        list(facts.colors),
        block_size=args.block_size,
        margin=args.block_margin,
        **VARIANTS[args.variant],
    )
    probs_fn = block_probs(ClassPredictor(stand_in, SegInferencer()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with rasterio.Env(GDAL_CACHEMAX=64):
        src = open_source(args.tif)
        try:
            names, blocks = predict_to_outputs(src, probs_fn, out, "scene", opts)
        finally:
            src.close()
    sizes = {n: (out / n).stat().st_size for n in names}
    print(json.dumps({"seconds": time.perf_counter() - t0, "blocks": blocks, "bytes": sizes}))


def main(argv=None) -> int:
    import os
    import resource  # noqa: F401  (wait4 rusage)
    import subprocess

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["all"])
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--block-margin", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--_case", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tif", default="", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="all", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._case:
        case(args)
        return 0
    from benchmark_geotiff import make_geotiff

    tmp = Path(tempfile.mkdtemp(prefix="segclip_geo_"))
    print(
        f"{'size':>6} {'outputs':>10} {'seconds':>8} {'CPU s':>7} {'s/Mpix':>7} "
        f"{'peak RSS MB':>12}  bytes"
    )
    for size in args.sizes:
        tif = tmp / f"scene_{size}.tif"
        make_geotiff(tif, size)
        for variant in args.variants:
            out = tmp / f"out_{size}_{variant}"
            cmd = [sys.executable, __file__, "--_case", "--tif", str(tif), "--out", str(out)]
            cmd += ["--variant", variant, "--threads", str(args.threads)]
            cmd += ["--block-size", str(args.block_size), "--block-margin", str(args.block_margin)]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            _, status, usage = os.wait4(proc.pid, 0)
            text = proc.stdout.read()
            if status:
                print(f"{size} {variant}: FAILED\n{proc.stderr.read()[-3000:]}")
                continue
            res = json.loads(text.strip().splitlines()[-1])
            mpix = size * size / 1e6
            short = {k.replace("scene_", ""): v for k, v in res["bytes"].items()}
            cpu = usage.ru_utime + usage.ru_stime  # the child's CPU time: robust to busy cores
            print(
                f"{size:6d} {variant:>10} {res['seconds']:8.1f} {cpu:7.1f} "
                f"{res['seconds'] / mpix:7.2f} "
                f"{usage.ru_maxrss / 1024:12.0f}  {short}",
                flush=True,
            )
        tif.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
