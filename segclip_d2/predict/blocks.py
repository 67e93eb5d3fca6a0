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


class ClassPredictor:
    """RGB uint8 (h, w, 3) + validity (h, w) -> class ids (h, w) uint8 (``IGNORE_LABEL`` where
    invalid) and class probabilities (K, h, w) float32 (``None`` for a block with no valid pixel)
    through ``inferencer(predict_fn, image)``. The model's class scores are normalised to sum to
    1 over the K classes at every pixel (the argmax is unchanged)."""

    def __init__(self, predict_fn: PredictFn, inferencer: SegInferencer, device="cpu"):
        import torch

        self.predict_fn = predict_fn
        self.inferencer = inferencer
        self.device = torch.device(device)

    def __call__(self, rgb: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        ids = np.full(rgb.shape[:2], IGNORE_LABEL, dtype=np.uint8)
        if not valid.any():
            return ids, None  # an all-no-data block needs no model
        import torch

        image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)  # (3, h, w)
        probs = self.inferencer(self.predict_fn, image.to(self.device).float())  # (K, h, w)
        pred = probs.argmax(dim=0).to(torch.uint8).cpu().numpy()
        ids[valid] = pred[valid]
        # Class scores (sum over queries of p(class) * mask) -> a distribution over the K classes.
        probs = probs / probs.sum(dim=0, keepdim=True).clamp_min(1e-12)
        return ids, probs.cpu().numpy()


class ResampledPredictor:
    """Predicts at another ground resolution: each block is resized by ``scale`` (= input pixel
    size / model pixel size; < 1 shrinks) before ``predictor``, and its probabilities are resized
    back bilinearly onto the block's own pixels; the class ids are the argmax of those, so the
    class map and the probabilities agree. Validity is resized nearest-neighbour."""

    def __init__(self, predictor, scale: float):
        if scale <= 0:
            raise ValueError(f"resampling scale must be > 0, got {scale}")
        self.predictor = predictor
        self.scale = float(scale)

    def __call__(self, rgb: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        import cv2

        h, w = valid.shape
        sh, sw = max(1, round(h * self.scale)), max(1, round(w * self.scale))
        interp = cv2.INTER_AREA if self.scale < 1 else cv2.INTER_LINEAR
        small = cv2.resize(np.ascontiguousarray(rgb), (sw, sh), interpolation=interp)
        small_valid = cv2.resize(valid.astype(np.uint8), (sw, sh), interpolation=cv2.INTER_NEAREST)
        _, probs = self.predictor(small, small_valid > 0)
        ids = np.full((h, w), IGNORE_LABEL, dtype=np.uint8)
        if probs is None:
            return ids, None
        # cv2 resizes (h, w, C) arrays channel-wise; keep the channel count <= 512.
        back = np.stack(
            [cv2.resize(p, (w, h), interpolation=cv2.INTER_LINEAR) for p in probs]
        )  # (K, h, w)
        pred = back.argmax(axis=0).astype(np.uint8)
        ids[valid] = pred[valid]
        return ids, back


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


BLOCK_BLENDS = ("cosine", "linear", "crop")


def predict_source(
    source,
    predictor: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray | None]],
    sinks: Sequence,
    block_size: int = 1024,
    margin: int = 128,
    progress: bool = False,
    blend: str = "cosine",
) -> int:
    """Predict ``source`` block by block and feed the result to ``sinks``:
    ``sink.add(y, x, ids (h, w), rgb (h, w, 3), probs (K, h, w) or None)``.

    Every block is predicted with ``margin`` pixels of context on each side. ``blend="crop"``
    keeps only each block's centre; ``"cosine"`` / ``"linear"`` blend the overlapping
    ``2 * margin`` bands of neighbouring blocks with weights tapering towards each window's edge
    (:func:`~segclip_d2.predict.windows.taper_1d`), so no hard seam is left between blocks.
    Blended pixels are handed to the sinks as soon as every block covering them is done; pending
    sums cover about ``2 * margin`` rows of the raster's width, so memory does not grow with the
    raster's height and only by that strip with its width.

    Returns the number of blocks run.
    """
    height, width = source.height, source.width
    if block_size <= 0 or margin < 0:
        raise ValueError(f"block size must be > 0 and margin >= 0, got {block_size}, {margin}")
    if blend not in BLOCK_BLENDS:
        raise ValueError(f"block blend must be one of {BLOCK_BLENDS}, got {blend!r}")
    blocks = block_grid(height, width, block_size)
    if len(blocks) == 1:
        margin = 0
    it = blocks
    if progress:
        from tqdm import tqdm

        it = tqdm(blocks, desc=f"{getattr(source, 'path', 'image')}", unit="block", leave=False)
    acc = None
    if blend != "crop" and margin > 0:
        acc = _BlendAccumulator(source, blocks, block_size, margin, blend, sinks)
    for y, x, h, w in it:
        y0, x0 = max(0, y - margin), max(0, x - margin)
        y1, x1 = min(height, y + h + margin), min(width, x + w + margin)
        rgb, valid = source.read(y0, x0, y1 - y0, x1 - x0)
        ids, probs = predictor(rgb, valid)  # (y1 - y0, x1 - x0), (K, ...) or None
        if acc is not None:
            acc.add(y0, x0, y1, x1, probs)
            continue
        cy, cx = y - y0, x - x0
        centre = (slice(cy, cy + h), slice(cx, cx + w))
        probs_c = None if probs is None else probs[(slice(None), *centre)]
        for sink in sinks:
            sink.add(y, x, ids[centre], rgb[centre], probs_c)
    if acc is not None:
        acc.finish()
    return len(blocks)


class _BlendAccumulator:
    """Weighted sums of block probabilities on a grid of ``cell``-sized squares (cell = gcd of
    block size and margin, so every block window is a union of cells). A cell is emitted, and its
    sums dropped, once every block window covering it has been added."""

    def __init__(self, source, blocks, block_size, margin, blend, sinks):
        import math

        self.source, self.sinks, self.blend, self.margin = source, sinks, blend, margin
        self.height, self.width = source.height, source.width
        self.cell = math.gcd(block_size, margin)
        ny, nx = -(-self.height // self.cell), -(-self.width // self.cell)
        # Number of block windows covering each cell; counts down as windows arrive.
        self.todo = np.zeros((ny, nx), np.int32)
        for y, x, h, w in blocks:
            self.todo[self._cells(y, x, h, w)] += 1
        self.sums: dict[tuple[int, int], list] = {}  # cell -> [sum (K, ch, cw) | None, wsum]

    def _cells(self, y, x, h, w) -> tuple[slice, slice]:
        c = self.cell
        y0, x0 = max(0, y - self.margin), max(0, x - self.margin)
        y1 = min(self.height, y + h + self.margin)
        x1 = min(self.width, x + w + self.margin)
        return slice(y0 // c, -(-y1 // c)), slice(x0 // c, -(-x1 // c))

    def add(self, y0, x0, y1, x1, probs) -> None:
        from .windows import window_weight

        c = self.cell
        ramp = (2 * self.margin, 2 * self.margin)
        wt = None
        if probs is not None:
            wt = window_weight(
                (y0, x0, y1 - y0, x1 - x0), self.height, self.width, ramp, self.blend
            )  # (h, w)
        done = []
        for cy in range(y0 // c, -(-y1 // c)):
            for cx in range(x0 // c, -(-x1 // c)):
                py, px = cy * c, cx * c
                ch, cw = min(c, self.height - py), min(c, self.width - px)
                entry = self.sums.get((cy, cx))
                if entry is None:
                    entry = self.sums[(cy, cx)] = [None, np.zeros((ch, cw), np.float32)]
                if probs is not None:
                    ly, lx = py - y0, px - x0
                    wc = wt[ly : ly + ch, lx : lx + cw]
                    pc = probs[:, ly : ly + ch, lx : lx + cw] * wc
                    entry[0] = pc if entry[0] is None else entry[0] + pc
                    entry[1] += wc
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
        c = self.cell
        y, x = cy * c, cxs[0] * c
        h = min(c, self.height - y)
        parts = [self.sums.pop((cy, cx)) for cx in cxs]
        w = sum(p[1].shape[1] for p in parts)
        rgb, valid = self.source.read(y, x, h, w)
        ids = np.full((h, w), IGNORE_LABEL, dtype=np.uint8)
        probs = None
        if any(p[0] is not None for p in parts):
            k = next(p[0].shape[0] for p in parts if p[0] is not None)
            probs = np.zeros((k, h, w), np.float32)
            col = 0
            for total, wsum in parts:
                cw = wsum.shape[1]
                if total is not None:
                    probs[:, :, col : col + cw] = total / np.maximum(wsum, 1e-12)
                col += cw
            pred = probs.argmax(axis=0).astype(np.uint8)
            ids[valid] = pred[valid]
        for sink in self.sinks:
            sink.add(y, x, ids, rgb, probs)

    def finish(self) -> None:
        if self.sums or (self.todo != 0).any():
            raise RuntimeError("block blending: some pixels were never completed (internal error)")
