#!/usr/bin/env python
"""Seam artefacts of sliding-window inference: flat vs tapered blending of overlapping windows.

On a real tile, the whole image is predicted in one pass (the reference: no window borders), then
in sliding windows (``--crop`` / ``--stride``) combined with each blend. Printed per blend:

- ``border disagree``: share of pixels within ``--band`` pixels of an interior window border
  whose class differs from the whole-image prediction;
- ``elsewhere``: the same share away from window borders;
- ``edge breaks``: label changes between neighbouring pixels across a window border that the
  whole-image prediction does not have, per 1000 border pixel pairs.

The windows are predicted once and replayed for every blend, so the blends see identical window
outputs. Not part of the test suite.

    python tools/benchmark_seams.py --config-file configs/synthetic/segclip_cpu.yaml \\
        --image /work/shared/data/loveda/images/0.png --size 768 \\
        [--blocks 256 32] [--stand-in] [--opts MODEL.WEIGHTS output/synthetic_cpu/model_final.pth]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / "tools"))
from _bench import OFFLINE_OPTS  # noqa: E402  (random init, no weight lookups, CPU)


def border_masks(height, width, boxes, band):
    """(band mask (H, W), vertical-edge columns, horizontal-edge rows) of interior borders."""
    mask = np.zeros((height, width), bool)
    cols, rows = set(), set()
    for y, x, h, w in boxes:
        for c in (x, x + w):
            if 0 < c < width:
                cols.add(c)
                mask[:, max(0, c - band) : c + band] = True
        for r in (y, y + h):
            if 0 < r < height:
                rows.add(r)
                mask[max(0, r - band) : r + band, :] = True
    return mask, sorted(cols), sorted(rows)


def edge_breaks(ids, ref, cols, rows):
    """Label changes across the border lines present in ``ids`` but not in ``ref``, per 1000."""
    extra, total = 0, 0
    for c in cols:
        a, b = ids[:, c - 1] != ids[:, c], ref[:, c - 1] != ref[:, c]
        extra += int((a & ~b).sum())
        total += a.size
    for r in rows:
        a, b = ids[r - 1] != ids[r], ref[r - 1] != ref[r]
        extra += int((a & ~b).sum())
        total += a.size
    return 1000.0 * extra / max(1, total)


# Class centroids of the stand-in classifier in window-normalised RGB.
_CENTROIDS = np.random.default_rng(0).normal(0, 1, (7, 3)).astype(np.float32)


def stand_in(images):
    """(B, 3, h, w) -> (B, 7, h, w): softmax over distances of smoothed colours, normalised
    partly by the window's own mean and spread, to fixed centroids: the output depends on the
    window's content, as a network's does through its context."""
    import torch
    import torch.nn.functional as F

    x = F.avg_pool2d(images, 9, stride=1, padding=4, count_include_pad=False)
    # A quarter of the normalisation comes from the window, the rest is fixed.
    mean = 0.25 * x.mean(dim=(2, 3), keepdim=True) + 0.75 * 110.0
    std = 0.25 * x.std(dim=(2, 3), keepdim=True) + 0.75 * 50.0
    z = (x - mean) / std  # (B, 3, h, w)
    c = torch.from_numpy(_CENTROIDS).to(z)  # (7, 3)
    d = ((z[:, None] - c[None, :, :, None, None]) ** 2).sum(2)  # (B, 7, h, w)
    return (-d / 0.5).softmax(1)


def _main(argv=None) -> int:
    import cv2
    import torch

    from segclip_d2.config import load_config
    from segclip_d2.errors import ArgumentParser, UserError
    from segclip_d2.predict import SegInferencer, window_boxes
    from segclip_d2.predict.load import load_model
    from segclip_d2.predict.slide import slide_inference

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", default=str(REPO / "configs/synthetic/segclip_cpu.yaml"))
    p.add_argument("--image", default=str(REPO.parent / "shared/data/loveda/images/0.png"))
    p.add_argument("--size", type=int, default=768, help="square crop of the image (top-left)")
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--stride", type=int, default=171)
    p.add_argument("--band", type=int, default=8, help="pixels each side of a window border")
    p.add_argument(
        "--blocks",
        type=int,
        nargs=2,
        default=None,
        metavar=("SIZE", "MARGIN"),
        help="also measure the demo's blocks (predict_source) of SIZE with MARGIN: crop vs taper",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--stand-in",
        action="store_true",
        help="no model: a context-dependent colour classifier (each window normalised by its own "
        "colour statistics, as a network's context makes its output depend on the window)",
    )
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    weights = ""
    if args.stand_in:
        cfg = load_config(args.config_file, OFFLINE_OPTS + list(args.opts))
        predict_fn, weights = stand_in, "none: context-dependent stand-in classifier"
    else:  # the project's loader: safe reading; random init when MODEL.WEIGHTS is empty
        cfg, model = load_model(
            args.config_file, opts=OFFLINE_OPTS + list(args.opts), device=None, precision=None,
            optimize=False, allow_random_weights=True,
        )  # fmt: skip
        weights = cfg.MODEL.WEIGHTS
        predict_fn = model.predict_sem_seg_probs
    rgb = cv2.imread(args.image)
    if rgb is None:
        raise UserError(args.image, "cannot be read as an image", "pass a PNG/JPEG tile")
    rgb = rgb[: args.size, : args.size, ::-1].copy()
    image = torch.from_numpy(rgb).permute(2, 0, 1).float()
    height, width = image.shape[1:]
    inf = SegInferencer(cfg)

    def run(batch):
        return inf._run_batch(predict_fn, batch)

    with torch.no_grad():
        ref = run(image[None])[0].argmax(0).numpy()
        cache: list[torch.Tensor] = []

        def record(batch):
            out = run(batch)
            cache.append(out)
            return out

        crop, stride = (args.crop, args.crop), (args.stride, args.stride)
        slide_inference(record, image, crop, stride, cfg.TEST.SLIDE.BATCH_SIZE, "flat")
        results = {}
        for blend in ("flat", "linear", "cosine"):
            replay = iter(cache)
            probs = slide_inference(
                lambda b, r=replay: next(r), image, crop, stride, cfg.TEST.SLIDE.BATCH_SIZE, blend
            )
            results[blend] = probs.argmax(0).numpy()
    boxes = window_boxes(height, width, crop, stride)
    band, cols, rows = border_masks(height, width, boxes, args.band)
    print(
        f"image {args.image} crop {height}x{width}, windows {args.crop} stride {args.stride} "
        f"({len(boxes)} windows), weights {weights or 'random init (seed 0)'}"
    )
    print(f"{'blend':8s} {'border disagree':>16s} {'elsewhere':>10s} {'edge breaks/1000':>17s}")
    for blend, ids in results.items():
        diff = ids != ref
        print(
            f"{blend:8s} {100 * diff[band].mean():15.2f}% {100 * diff[~band].mean():9.2f}% "
            f"{edge_breaks(ids, ref, cols, rows):17.2f}"
        )
    if args.blocks:
        measure_blocks(args, rgb, ref, predict_fn, inf)
    return 0


def measure_blocks(args, rgb, ref, predict_fn, inf):
    """The demo's block pipeline (whole-image inference per block) against the whole image."""
    from segclip_d2.predict.blocks import (
        ClassPredictor,
        IdArraySink,
        block_grid,
        block_probs,
        predict_source,
    )
    from segclip_d2.raster.sources import ArraySource

    size, margin = args.blocks
    src = ArraySource.__new__(ArraySource)
    src.rgb, src.valid = rgb, np.ones(rgb.shape[:2], bool)
    src.height, src.width = rgb.shape[:2]
    probs_fn = block_probs(ClassPredictor(predict_fn, inf))
    blocks = block_grid(src.height, src.width, size)
    boxes = [(y, x, h, w) for y, x, h, w in blocks]
    band, cols, rows = border_masks(src.height, src.width, boxes, args.band)
    print(f"\ndemo blocks of {size} with margin {margin} ({len(blocks)} blocks)")
    print(f"{'blend':8s} {'border disagree':>16s} {'elsewhere':>10s} {'edge breaks/1000':>17s}")
    for blend in ("crop", "linear", "cosine"):
        sink = IdArraySink(src.height, src.width)
        predict_source(src, probs_fn, [sink], block_size=size, margin=margin, blend=blend)
        diff = sink.ids != ref
        print(
            f"{blend:8s} {100 * diff[band].mean():15.2f}% {100 * diff[~band].mean():9.2f}% "
            f"{edge_breaks(sink.ids, ref, cols, rows):17.2f}"
        )


def main(argv=None) -> int:
    """The tool under the error contract: a bad config or weights file is one line, exit 2."""
    from segclip_d2.errors import run_main

    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
