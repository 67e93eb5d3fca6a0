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
from .visualize import colorize

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
    invalid) through ``inferencer(predict_fn, image)``."""

    def __init__(self, predict_fn: PredictFn, inferencer: SegInferencer, device="cpu"):
        import torch

        self.predict_fn = predict_fn
        self.inferencer = inferencer
        self.device = torch.device(device)

    def __call__(self, rgb: np.ndarray, valid: np.ndarray) -> np.ndarray:
        ids = np.full(rgb.shape[:2], IGNORE_LABEL, dtype=np.uint8)
        if not valid.any():
            return ids  # an all-no-data block needs no model
        import torch

        image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)  # (3, h, w)
        probs = self.inferencer(self.predict_fn, image.to(self.device).float())  # (K, h, w)
        pred = probs.argmax(dim=0).to(torch.uint8).cpu().numpy()
        ids[valid] = pred[valid]
        return ids


class IdArraySink:
    """Collects the full class-id map (ordinary images, which are in memory anyway)."""

    def __init__(self, height: int, width: int):
        self.ids = np.full((height, width), IGNORE_LABEL, dtype=np.uint8)

    def add(self, y, x, ids, rgb):
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

    def add(self, y, x, ids, rgb):
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


def predict_source(
    source,
    predictor: Callable[[np.ndarray, np.ndarray], np.ndarray],
    sinks: Sequence,
    block_size: int = 1024,
    margin: int = 128,
    progress: bool = False,
) -> int:
    """Predict ``source`` block by block, feeding every block's centre to ``sinks``.

    Returns the number of blocks run.
    """
    height, width = source.height, source.width
    if block_size <= 0 or margin < 0:
        raise ValueError(f"block size must be > 0 and margin >= 0, got {block_size}, {margin}")
    blocks = block_grid(height, width, block_size)
    if len(blocks) == 1:
        margin = 0
    it = blocks
    if progress:
        from tqdm import tqdm

        it = tqdm(blocks, desc=f"{getattr(source, 'path', 'image')}", unit="block", leave=False)
    for y, x, h, w in it:
        y0, x0 = max(0, y - margin), max(0, x - margin)
        y1, x1 = min(height, y + h + margin), min(width, x + w + margin)
        rgb, valid = source.read(y0, x0, y1 - y0, x1 - x0)
        ids = predictor(rgb, valid)  # (y1 - y0, x1 - x0)
        cy, cx = y - y0, x - x0
        centre = (slice(cy, cy + h), slice(cx, cx + w))
        for sink in sinks:
            sink.add(y, x, ids[centre], rgb[centre])
    return len(blocks)
