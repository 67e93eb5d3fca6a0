"""Block-wise prediction of images of any size (the demo's engine).

An image or raster is cut into blocks of ``block_size`` pixels; each block is read with a
``margin`` of context on every side (clipped at the border), run through a :class:`SegInferencer`
(whole or sliding window, TTA, precision as configured), and only its centre is kept. Outputs are
fed block by block to sinks (a GeoTIFF written window by window, an in-memory class-id array for
ordinary images, a downsampled preview), so for GeoTIFFs memory depends on the block size, not on
the raster size. An image no larger than one block is predicted in one piece.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..data.dataset_facts import IGNORE_LABEL
from ..data.visualize import colorize
from .windows import BLENDS

if TYPE_CHECKING:  # torch is imported only by ClassPredictor (the ONNX path has no torch)
    from .inferencer import PredictFn, SegInferencer

logger = logging.getLogger(__name__)


def block_grid(height: int, width: int, block: int) -> list[tuple[int, int, int, int]]:
    """Non-overlapping blocks ``(y, x, h, w)`` tiling the image, row-major."""
    return [
        (y, x, min(block, height - y), min(block, width - x))
        for y in range(0, height, block)
        for x in range(0, width, block)
    ]


# The pipeline's view of a back-end: the model's C bands (h, w, C) (RGB uint8 for an RGB
# model) + validity (h, w) bool -> class
# probabilities (K, h, w) float32 summing to 1 over K, or None for a block with no valid pixel.
ProbsFn = Callable[[np.ndarray, np.ndarray], "np.ndarray | None"]


def class_ids(probs: np.ndarray | None, valid: np.ndarray) -> np.ndarray:
    """Class ids (h, w) uint8 of ``probs`` (K, h, w): the argmax, ``IGNORE_LABEL`` where not
    ``valid`` (or everywhere when ``probs`` is None). The one argmax of every pixel."""
    ids = np.full(valid.shape, IGNORE_LABEL, dtype=np.uint8)
    if probs is not None:
        pred = probs.argmax(axis=0).astype(np.uint8)
        ids[valid] = pred[valid]
    return ids


def block_probs(backend) -> ProbsFn:
    """The :data:`ProbsFn` of a back-end with ``predict_probs(rgb) -> (K, h, w)`` (the PyTorch
    :class:`ClassPredictor` and the ONNX ``OnnxSegmenter`` alike)."""

    def run(rgb: np.ndarray, valid: np.ndarray) -> np.ndarray | None:
        if not valid.any():
            return None  # an all-no-data block needs no model
        return backend.predict_probs(rgb)

    return run


class ClassPredictor:
    """The PyTorch back-end: (h, w, C) bands (RGB uint8 for an RGB model; the model checks C) ->
    class probabilities (K, h, w) float32 through
    ``inferencer(predict_fn, image)``; the model's class scores are normalised to sum to 1 over
    the K classes at every pixel (the argmax is unchanged). Called as ``predictor(rgb, valid) ->
    (ids, probs)`` like ``deploy.onnx_predictor.OnnxSegmenter``."""

    def __init__(self, predict_fn: PredictFn, inferencer: SegInferencer, device="cpu"):
        import torch

        self.predict_fn = predict_fn
        self.inferencer = inferencer
        self.device = torch.device(device)

    def predict_probs(self, rgb: np.ndarray) -> np.ndarray:
        import torch

        image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)  # (C, h, w)
        probs = self.inferencer(self.predict_fn, image.to(self.device).float())  # (K, h, w)
        # Class scores (sum over queries of p(class) * mask) -> a distribution over the K classes.
        probs = probs / probs.sum(dim=0, keepdim=True).clamp_min(1e-12)
        return probs.float().cpu().numpy()

    def __call__(self, rgb: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        probs = block_probs(self)(rgb, valid)
        return class_ids(probs, valid), probs


class ResampledProbs:
    """Predicts at another ground resolution: each block is resized by ``scale`` (= input pixel
    size / model pixel size; < 1 shrinks) before ``probs_fn``, and its probabilities are resized
    back bilinearly onto the block's own pixels. Validity is resized nearest-neighbour."""

    def __init__(self, probs_fn: ProbsFn, scale: float):
        if scale <= 0:
            raise ValueError(f"resampling scale must be > 0, got {scale}")
        self.probs_fn = probs_fn
        self.scale = float(scale)

    def __call__(self, rgb: np.ndarray, valid: np.ndarray) -> np.ndarray | None:
        import cv2

        h, w = valid.shape
        sh, sw = max(1, round(h * self.scale)), max(1, round(w * self.scale))
        interp = cv2.INTER_AREA if self.scale < 1 else cv2.INTER_LINEAR
        small = cv2.resize(np.ascontiguousarray(rgb), (sw, sh), interpolation=interp)
        small_valid = cv2.resize(valid.astype(np.uint8), (sw, sh), interpolation=cv2.INTER_NEAREST)
        probs = self.probs_fn(small, small_valid > 0)
        if probs is None:
            return None
        # cv2 resizes (h, w, C) arrays channel-wise; keep the channel count <= 512.
        return np.stack(
            [cv2.resize(p, (w, h), interpolation=cv2.INTER_LINEAR) for p in probs]
        )  # (K, h, w)


class IdArraySink:
    """Collects the full class-id map (ordinary images, which are in memory anyway)."""

    def __init__(self, height: int, width: int):
        self.ids = np.full((height, width), IGNORE_LABEL, dtype=np.uint8)

    def add(self, y, x, ids, rgb, probs=None):
        self.ids[y : y + ids.shape[0], x : x + ids.shape[1]] = ids


class PreviewSink:
    """A preview of at most ``max_size`` pixels on the long side (nearest-neighbour samples):
    the input RGB and the class ids, filled block by block."""

    def __init__(self, height: int, width: int, max_size: int):
        self.scale = min(1.0, max_size / max(height, width))
        ph, pw = max(1, round(height * self.scale)), max(1, round(width * self.scale))
        # Source row / column sampled by every preview row / column.
        self._rows = np.minimum(((np.arange(ph) + 0.5) / self.scale).astype(np.int64), height - 1)
        self._cols = np.minimum(((np.arange(pw) + 0.5) / self.scale).astype(np.int64), width - 1)
        self.rgb = np.zeros((ph, pw, 3), dtype=np.uint8)
        self.ids = np.full((ph, pw), IGNORE_LABEL, dtype=np.uint8)

    def add(self, y, x, ids, rgb, probs=None):
        h, w = ids.shape
        pr = np.nonzero((self._rows >= y) & (self._rows < y + h))[0]
        pc = np.nonzero((self._cols >= x) & (self._cols < x + w))[0]
        if pr.size == 0 or pc.size == 0:
            return
        sr, sc = self._rows[pr] - y, self._cols[pc] - x
        self.ids[np.ix_(pr, pc)] = ids[np.ix_(sr, sc)]
        self.rgb[np.ix_(pr, pc)] = rgb[np.ix_(sr, sc)]

    def color(self, colors: Sequence[Sequence[int]]) -> np.ndarray:
        return colorize(self.ids, colors)


# How the overlapping margins of neighbouring blocks are combined: "crop" keeps each block's
# centre; the others are the taper shapes of sliding windows (TEST.SLIDE.BLEND), the same names
# with the same meaning (predict/windows.py).
BLOCK_BLENDS = ("crop", *BLENDS)


def check_blend(blend: str) -> str:
    """``blend`` if it is one of :data:`BLOCK_BLENDS`, else a ValueError naming them."""
    if blend not in BLOCK_BLENDS:
        raise ValueError(f"block blend must be one of {', '.join(BLOCK_BLENDS)}, got {blend!r}")
    return blend


def predict_source(
    source,
    probs_fn: ProbsFn,
    sinks: Sequence,
    block_size: int = 1024,
    margin: int = 128,
    progress: bool = False,
    blend: str = "cosine",
) -> int:
    """Predict ``source`` block by block and feed the result to ``sinks``:
    ``sink.add(y, x, ids (h, w), rgb (h, w, 3), probs (K, h, w) or None)``; ``probs_fn`` gets
    the blocks as read (the model's bands), the sinks ``source.display`` of them (RGB).

    Every block is predicted with ``margin`` pixels of context on each side and read once.
    ``blend="crop"`` keeps only each block's centre; the tapers (``flat``, ``linear``,
    ``cosine``) blend the overlapping ``2 * margin`` bands of neighbouring blocks with weights
    tapering towards each window's edge (:func:`~segclip_d2.predict.windows.taper_1d`), so no
    hard seam is left between blocks. Blended pixels are handed to the sinks as soon as every
    block covering them is done; pending sums cover about ``2 * margin`` rows of the raster's
    width, so memory does not grow with the raster's height. The class ids are the argmax of the
    final probabilities, computed once per pixel.

    Returns the number of blocks run.
    """
    height, width = source.height, source.width
    if block_size <= 0 or margin < 0:
        raise ValueError(f"block size must be > 0 and margin >= 0, got {block_size}, {margin}")
    check_blend(blend)
    blocks = block_grid(height, width, block_size)
    if len(blocks) == 1:
        margin = 0
    it = blocks
    if progress:
        from tqdm import tqdm

        it = tqdm(blocks, desc=f"{getattr(source, 'path', 'image')}", unit="block", leave=False)
    display = getattr(source, "display", None) or (lambda image: image)
    acc = None
    if blend != "crop" and margin > 0:
        acc = _BlendAccumulator(height, width, blocks, block_size, margin, blend, sinks)
    for y, x, h, w in it:
        y0, x0 = max(0, y - margin), max(0, x - margin)
        y1, x1 = min(height, y + h + margin), min(width, x + w + margin)
        rgb, valid = source.read(y0, x0, y1 - y0, x1 - x0)
        probs = probs_fn(rgb, valid)  # (K, y1 - y0, x1 - x0) or None
        rgb = display(rgb)  # the sinks' view: (h, w, 3) uint8 RGB
        if acc is not None:
            acc.add(y0, x0, rgb, valid, probs)
            continue
        centre = (slice(y - y0, y - y0 + h), slice(x - x0, x - x0 + w))
        probs_c = None if probs is None else probs[(slice(None), *centre)]
        rgb_c, valid_c = rgb[centre], valid[centre]
        ids = class_ids(probs_c, valid_c)
        for sink in sinks:
            sink.add(y, x, ids, rgb_c, probs_c)
    if acc is not None:
        acc.finish()
    return len(blocks)


class _BlendAccumulator:
    """Weighted sums of block probabilities on a grid of ``cell``-sized squares (cell = gcd of
    block size and margin, so every block window is a union of cells), with each cell's pixels
    as first read. A cell is emitted, and dropped, once every block window covering it is in."""

    def __init__(self, height, width, blocks, block_size, margin, blend, sinks):
        import math

        self.sinks, self.blend, self.margin = sinks, blend, margin
        self.height, self.width = height, width
        self.cell = math.gcd(block_size, margin)
        ny, nx = -(-self.height // self.cell), -(-self.width // self.cell)
        # Number of block windows covering each cell; counts down as windows arrive.
        self.todo = np.zeros((ny, nx), np.int32)
        for y, x, h, w in blocks:
            y0, x0 = max(0, y - margin), max(0, x - margin)
            y1, x1 = min(height, y + h + margin), min(width, x + w + margin)
            self.todo[
                y0 // self.cell : -(-y1 // self.cell), x0 // self.cell : -(-x1 // self.cell)
            ] += 1
        # cell -> [weighted sum (K, ch, cw) | None, weight sum (ch, cw), rgb, valid]
        self.sums: dict[tuple[int, int], list] = {}

    def add(self, y0, x0, rgb, valid, probs) -> None:
        from .windows import window_weight

        c = self.cell
        y1, x1 = y0 + valid.shape[0], x0 + valid.shape[1]
        wt = None
        if probs is not None:
            ramp = (2 * self.margin, 2 * self.margin)
            box = (y0, x0, y1 - y0, x1 - x0)
            wt = window_weight(box, self.height, self.width, ramp, self.blend)  # (h, w)
        done = []
        for cy in range(y0 // c, -(-y1 // c)):
            for cx in range(x0 // c, -(-x1 // c)):
                ly, lx = cy * c - y0, cx * c - x0
                cell = (slice(ly, ly + min(c, y1 - cy * c)), slice(lx, lx + min(c, x1 - cx * c)))
                entry = self.sums.get((cy, cx))
                if entry is None:
                    wzero = np.zeros(valid[cell].shape, np.float32)
                    entry = self.sums[(cy, cx)] = [None, wzero, rgb[cell], valid[cell]]
                if probs is not None:
                    pc = probs[(slice(None), *cell)] * wt[cell]
                    entry[0] = pc if entry[0] is None else entry[0] + pc
                    entry[1] += wt[cell]
                self.todo[cy, cx] -= 1
                if self.todo[cy, cx] == 0:
                    done.append((cy, cx))
        if done:
            self._emit(done)

    def _emit(self, cells) -> None:
        """Hand the finished ``cells`` to the sinks as one rectangle per cell row run."""
        rows: dict[int, list[int]] = {}
        for cy, cx in cells:
            rows.setdefault(cy, []).append(cx)
        for cy, cxs in sorted(rows.items()):
            cxs.sort()
            run = [cxs[0]]
            for cx in cxs[1:] + [None]:
                if cx is not None and cx == run[-1] + 1:
                    run.append(cx)
                    continue
                self._emit_run(cy, run)
                if cx is not None:
                    run = [cx]

    def _emit_run(self, cy, cxs) -> None:
        parts = [self.sums.pop((cy, cx)) for cx in cxs]
        rgb = np.concatenate([p[2] for p in parts], axis=1)
        valid = np.concatenate([p[3] for p in parts], axis=1)
        probs = None
        if any(p[0] is not None for p in parts):
            k = next(p[0].shape[0] for p in parts if p[0] is not None)
            probs = np.concatenate(
                [
                    np.zeros((k, *wsum.shape), np.float32)
                    if total is None
                    else total / np.maximum(wsum, 1e-12)
                    for total, wsum, _, _ in parts
                ],
                axis=2,
            )
        ids = class_ids(probs, valid)
        for sink in self.sinks:
            sink.add(cy * self.cell, cxs[0] * self.cell, ids, rgb, probs)

    def finish(self) -> None:
        if self.sums or (self.todo != 0).any():
            raise RuntimeError("block blending: some pixels were never completed (internal error)")
