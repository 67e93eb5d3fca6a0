#!/usr/bin/env python
"""Exported models side by side: fp32 vs int8 on the same real tiles, and Deepness's tiling.

    # latency, peak RSS and pixel agreement; every model runs in its own process, the rounds
    # alternate (fp32, int8, fp32, int8, ...) so a change in the machine's load hits both
    python tools/benchmark_onnx.py --models model.onnx model.int8.onnx \\
        --images /path/to/tiles/ [--tiles 8] [--rounds 3] [--threads 2] [--json out.json]
    # what QGIS users get: the plugin's tiling (black padding, overlap, centres pasted) at each
    # overlap vs the project's own windows (OnnxSegmenter), on every image; "mean-padded" is the
    # same tiling with the padding in the mean colour instead of black
    python tools/benchmark_onnx.py --models model.onnx --images tiles/ --overlaps 10 15 25 33 50

Tiles are whole ``S x S`` cuts of the images (S: the first model's tile size), taken from the
images in turn. The first model is the reference of the agreement. Latency is per tile (batch
1), the median over the rounds' tiles; peak RSS is the child process's ``ru_maxrss`` (numpy,
onnxruntime and the session included). Torch is never imported. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from segclip_d2.errors import UserError, run_main  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, metavar="ONNX", help="first: reference")
    p.add_argument("--images", required=True, metavar="DIR", help="folder of real images")
    p.add_argument("--tiles", type=int, default=8, help="tiles to run, at most (8)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per model (3)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all)")
    p.add_argument("--overlaps", type=float, nargs="*", default=None, help="Deepness sweep, %%")
    p.add_argument("--json", default="", metavar="FILE", help="also write the results here")
    p.add_argument(
        "--child", nargs=3, metavar=("MODEL", "TILES_NPY", "OUT_NPY"), help=argparse.SUPPRESS
    )
    return p


def child(model: str, tiles_npy: str, out_npy: str, threads: int) -> None:
    """Run ``model`` over the tiles once (after one warm-up tile); print a JSON line."""
    import numpy as np

    from segclip_d2.deploy.onnx_predictor import OnnxSegmenter

    tiles = np.load(tiles_npy)
    seg = OnnxSegmenter(model, threads=threads)
    seg.predict_batch(tiles[:1])
    times, ids = [], []
    for t in tiles:
        t0 = time.perf_counter()
        probs = seg.predict_batch(t[None])[0]
        times.append(time.perf_counter() - t0)
        ids.append(probs.argmax(0).astype(np.uint8))
    np.save(out_npy, np.stack(ids))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB -> MiB
    print(json.dumps({"times": times, "peak_rss_mib": peak}))


def run_model(model: str, tiles_npy: str, out_npy: str, threads: int) -> dict:
    argv = [sys.executable, __file__, "--models", model, "--images", ".",
            "--threads", str(threads), "--child", model, tiles_npy, out_npy]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=3600)
    if run.returncode != 0:
        raise RuntimeError(f"{model}: the benchmark child failed:\n{run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def compare(args, tiles) -> list[dict]:
    """Latency, peak RSS and agreement with the first model, each model in its own process."""
    import numpy as np

    rows = {m: {"model": m, "times": [], "peak_rss_mib": 0.0} for m in args.models}
    with tempfile.TemporaryDirectory() as work:
        tiles_npy = os.path.join(work, "tiles.npy")
        np.save(tiles_npy, tiles)
        ids = {}
        for _ in range(max(1, args.rounds)):
            for i, m in enumerate(args.models):
                out = os.path.join(work, f"ids{i}.npy")
                res = run_model(m, tiles_npy, out, args.threads)
                rows[m]["times"] += res["times"]
                rows[m]["peak_rss_mib"] = max(rows[m]["peak_rss_mib"], res["peak_rss_mib"])
                ids[m] = np.load(out)
    ref = ids[args.models[0]]
    base = float(np.median(rows[args.models[0]]["times"]))
    for m, row in rows.items():
        row["median_s"] = float(np.median(row["times"]))
        row["speedup"] = base / row["median_s"]
        row["agreement"] = float((ids[m] == ref).mean())
        row["per_tile_agreement_min"] = float((ids[m] == ref).mean(axis=(1, 2)).min())
        row["mib"] = os.path.getsize(m) / 2**20
        del row["times"]
    return list(rows.values())


def overlap_sweep(model: str, images: list, overlaps: list[float]) -> list[dict]:
    """Deepness tiling (black / mean padding) vs the project's windows, per overlap."""
    import numpy as np

    from segclip_d2.deploy.deepness import deepness_class_ids, deepness_grid
    from segclip_d2.deploy.onnx_predictor import OnnxSegmenter

    seg = OnnxSegmenter(model)
    mean = np.round(seg.mean).astype(np.uint8)

    def mean_padded(tiles):
        tiles = tiles.copy()
        tiles[tiles.max(-1) == 0] = mean
        return seg.predict_batch(tiles)

    own = [seg.predict_probs(rgb).argmax(0) for rgb in images]
    rows = []
    for p in overlaps:
        row = {"overlap_percent": p, "tiles": 0, "black": [], "mean": []}
        for rgb, ref in zip(images, own):
            g = deepness_grid(rgb.shape[0], rgb.shape[1], seg.tile_size, p)
            row["tiles"] += g.rows * g.cols
            for key, fn in (("black", seg.predict_batch), ("mean", mean_padded)):
                ids = deepness_class_ids(fn, rgb, seg.tile_size, p)
                row[key].append(float((ids == ref).mean()))
        rows.append(row)
    return rows


def read_images(folder: str, bands=None, values=None) -> list:
    """The images of ``folder`` as the demo reads them for the model of ``bands``/``values``."""
    from segclip_d2.deploy.quantize import IMAGE_SUFFIXES
    from segclip_d2.raster.sources import InputError, read_whole

    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UserError(folder, "needs readable images (" + ", ".join(IMAGE_SUFFIXES) + ")")
    images = []
    for p in paths:
        try:
            images.append(read_whole(p, None, bands, values))
        except InputError as e:
            raise UserError(str(p), str(e).removeprefix(f"{p}: ")) from None
    return images


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    if args.child:
        child(*args.child, args.threads)
        return 0
    for m in args.models:
        if not os.path.isfile(m):
            raise UserError(m, "no such ONNX model file", "export one with tools/export_onnx.py")
    if not os.path.isdir(args.images):
        raise UserError(args.images, "no such folder of images")
    from segclip_d2.deploy.onnx_predictor import OnnxSegmenter
    from segclip_d2.deploy.quantize import calibration_tiles

    first = OnnxSegmenter(args.models[0])
    tile = first.tile_size
    results = {"cpu": cpu_name()}
    if args.overlaps:
        images = read_images(args.images, first.bands, first.values)
        sweep = overlap_sweep(args.models[0], images, args.overlaps)
        results["deepness_overlaps"] = sweep
        print(f"Deepness tiling vs the project's windows ({args.models[0]}, tile {tile}):")
        for r in sweep:
            print(
                f"  overlap {r['overlap_percent']:g}%: {r['tiles']} tiles, agreement black-padded "
                + " / ".join(f"{100 * v:.2f}%" for v in r["black"])
                + ", mean-padded "
                + " / ".join(f"{100 * v:.2f}%" for v in r["mean"])
            )
    if len(args.models) > 1 or not args.overlaps:
        tiles = calibration_tiles(args.images, tile, args.tiles, first.bands, first.values)
        rows = compare(args, tiles)
        results["models"] = rows
        print(f"{len(tiles)} tiles of {tile} px, {args.rounds} rounds, CPU: {results['cpu']}")
        for r in rows:
            print(
                f"  {r['model']}: {r['mib']:.1f} MiB, median {1000 * r['median_s']:.0f} ms/tile "
                f"({r['speedup']:.2f}x the first), peak RSS {r['peak_rss_mib']:.0f} MiB, pixel "
                f"agreement {100 * r['agreement']:.2f}% (worst tile "
                f"{100 * r['per_tile_agreement_min']:.2f}%)"
            )
    if args.json:
        from segclip_d2.utils.atomic import atomic_output

        with atomic_output(args.json) as tmp:
            Path(tmp).write_text(json.dumps(results, indent=2))
    return 0


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return "unknown"
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                 if ln.startswith("model name")), "unknown")  # fmt: skip
    flags = [f for f in ("avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8") if f" {f}" in text]
    return f"{name} ({', '.join(flags) or 'no VNNI'})"


if __name__ == "__main__":
    sys.exit(run_main(main))
