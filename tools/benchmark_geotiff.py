#!/usr/bin/env python
"""Demo memory and time on synthetic GeoTIFFs of growing size: each run is a ``demo/demo.py``
process (its peak RSS measured alone), with the class map only (plain or COG) or every output
(probabilities, confidence, GeoPackage polygons; COG or not).

    python tools/benchmark_geotiff.py --allow-random-weights --sizes 2048 4096 8192 \
        --variants class all

Nothing here is part of the test suite.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import (  # noqa: E402
    OFFLINE_OPTS,
    REPO,
    SMALL_CONFIG,
    bench_main,
    fmt_row,
    run_child,
)


def make_geotiff(path: Path, size: int, seed: int = 0) -> None:
    """A synthetic uint16 3-band GeoTIFF (EPSG:32633, 0.5 m pixels, nodata 0 border), written by
    row blocks so even large ones take little memory."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    g = np.random.default_rng(seed)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=size,
        width=size,
        count=3,
        dtype="uint16",
        crs="EPSG:32633",
        nodata=0,
        tiled=True,
        blockxsize=256,
        blockysize=256,
        transform=from_origin(500000, 5000000, 0.5, 0.5),
    ) as ds:
        step = 512
        for y in range(0, size, step):
            h = min(step, size - y)
            yy = np.arange(y, y + h)[:, None]
            xx = np.arange(size)[None]
            base = (np.sin(yy / 97.0) + np.cos(xx / 61.0)) * 1000 + 2000
            block = np.stack([base + g.normal(0, 200, (h, size)) for _ in range(3)])
            block = np.clip(block, 1, 4095).astype(np.uint16)
            block[:, :, :16] = 0  # a no-data strip
            ds.write(block, window=Window(0, y, size, h))


# Demo output flags of each --geotiff-scaling variant.
OUTPUT_VARIANTS = {
    "class": ["--no-cog"],
    "class-cog": ["--cog"],
    "all": ["--cog", "--probabilities", "--confidence", "--vector", "gpkg"],
    "all-nocog": ["--no-cog", "--probabilities", "--confidence", "--vector", "gpkg"],
}


def mode_geotiff_scaling(args) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="segclip_geotiff_"))
    print(f"\n== demo on synthetic GeoTIFFs, {Path(args.config).name}, block {args.block_size} ==")
    widths = (8, 12, 10, 10, 12, 14)
    print(fmt_row(("size", "outputs", "Mpixels", "seconds", "s / Mpix", "peak RSS MB"), widths))
    for size in args.sizes:
        tif = tmp / f"scene_{size}.tif"
        make_geotiff(tif, size)
        for variant in args.variants:
            _geotiff_case(args, tmp, tif, size, variant, widths)
        tif.unlink()
    print(f"(wall time includes model build; outputs in {tmp})")


def _geotiff_case(args, tmp, tif, size, variant, widths) -> None:
    """One demo run in a child process; prints its row."""
    out = tmp / f"out_{size}_{variant}"
    argv = [
        sys.executable,
        str(REPO / "demo" / "demo.py"),
        "--config-file",
        str(args.config),
        "--input",
        str(tif),
        "--output",
        str(out),
        "--no-progress",
        *(["--allow-random-weights"] if args.allow_random_weights else []),
        "--block-size",
        str(args.block_size),
        "--block-margin",
        str(args.block_margin),
        *OUTPUT_VARIANTS[variant],
        "--opts",
        *OFFLINE_OPTS,
        *args.opts,
    ]
    env_threads = f"torch threads {args.threads}"
    code, wall, rss, text = run_child(
        ["env", f"OMP_NUM_THREADS={args.threads}", *argv], timeout=3600
    )
    if code:
        print(f"{size} {variant}: FAILED ({env_threads})\n{text[-3000:]}")
        return
    mpix = size * size / 1e6
    row = (size, variant, f"{mpix:.1f}", f"{wall:.1f}", f"{wall / mpix:.2f}", f"{rss:.0f}")
    print(fmt_row(row, widths), flush=True)


def _arguments(p) -> None:
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument(
        "--variants",
        nargs="+",
        choices=sorted(OUTPUT_VARIANTS),
        default=["class"],
        help="outputs: class map only (plain / COG), or every output (probabilities, "
        "confidence, GeoPackage; COG or not)",
    )
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--block-margin", type=int, default=128)


def _run(args) -> None:
    args.config = args.config or str(SMALL_CONFIG)
    mode_geotiff_scaling(args)


def main(argv=None) -> int:
    return bench_main(
        argv, __doc__, "model config (default: the small synthetic CPU config)", _arguments, _run
    )


if __name__ == "__main__":
    sys.exit(main())
