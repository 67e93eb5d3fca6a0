"""How the Deepness QGIS plugin runs a Segmentor, in numpy, to measure what QGIS users get.

Rewritten from the plugin's documentation and from reading how it computes its tiles
(``tile_params.py``, ``extent_utils.py``, ``map_processor_segmentation.py`` of
PUTvision/qgis-plugin-deepness); numpy only, so it runs next to the torch-free
:class:`~segclip_d2.deploy.onnx_predictor.OnnxSegmenter`. For a whole raster of ``h x w`` pixels
at the model's resolution, tile size ``S`` and overlap ``p`` %:

* overlap ``o = floor(2 * S * p / 100) // 2`` pixels, stride ``S - o`` (15 % of 512: o = 76,
  stride 436);
* each axis is padded up to ``S + n * stride`` (``S`` for an axis not longer than a tile) with
  black: RGB 0, which the standardisation turns into ``-mean / std``, not the mean colour the
  project pads with. The extra columns go to the right, the extra rows to the top (the plugin
  grows the map extent's maximum x and maximum y, and y grows northwards): 1024 px -> 1384 px,
  3 x 3 tiles;
* tile ``(i, j)`` starts at ``(i * stride, j * stride)`` of the padded image; the model's
  probabilities are zeroed below ``seg_thresh`` and the arg-max taken (a pixel where every class
  was zeroed becomes class 0); only the tile's centre is pasted: ``o // 2`` pixels are cut from
  each side that has a neighbour, later tiles overwrite earlier ones, nothing is averaged;
* with ``seg_small_segment`` k > 0 the class map of the padded image is median-filtered with an
  odd window ``2 * (k // 2) + 1`` (on the class numbers, not a majority vote), then the raster's
  part is cut out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np


class DeepnessGrid(NamedTuple):
    """The plugin's tiling of a ``height x width`` raster (all in pixels)."""

    tile: int
    overlap: int  # pixels shared by neighbouring tiles
    stride: int
    padded_height: int
    padded_width: int
    top: int  # black rows above the raster (the raster starts at row ``top``, column 0)
    rows: int  # tiles per column
    cols: int  # tiles per row


def overlap_pixels(tile: int, percent: float) -> int:
    """The plugin's overlap in pixels for an overlap in percent of the tile."""
    return int(tile * float(percent) / 50.0) // 2


def _padded(size: int, tile: int, stride: int) -> int:
    if size <= tile:
        return tile
    return size + (stride - (size - tile) % stride) % stride


def deepness_grid(height: int, width: int, tile: int, overlap_percent: float) -> DeepnessGrid:
    """The tiles the plugin runs over a whole ``height x width`` raster (see module doc)."""
    overlap = overlap_pixels(tile, overlap_percent)
    stride = tile - overlap
    if stride <= 0:
        raise ValueError(f"an overlap of {overlap_percent}% leaves no stride for tile {tile}")
    ph, pw = _padded(height, tile, stride), _padded(width, tile, stride)
    return DeepnessGrid(
        tile, overlap, stride, ph, pw, ph - height,
        (ph - tile) // stride + 1, (pw - tile) // stride + 1,
    )  # fmt: skip


def _paste_range(index: int, count: int, grid: DeepnessGrid) -> tuple[int, int]:
    """[start, stop) in padded-image coordinates that tile ``index`` of ``count`` writes."""
    start, half = index * grid.stride, grid.overlap // 2
    lo = start if index == 0 else start + half
    hi = start + grid.tile if index == count - 1 else start + grid.tile - half
    return lo, hi


def threshold_argmax(probs: np.ndarray, seg_thresh: float) -> np.ndarray:
    """(B, K, S, S) probabilities -> (B, S, S) class ids as the plugin labels them: every
    probability below ``seg_thresh`` set to 0, then the first arg-max."""
    if seg_thresh > 0:
        probs = np.where(probs < seg_thresh, np.float32(0), probs)
    return probs.argmax(1)


def median_filter_ids(ids: np.ndarray, small_segment: int) -> np.ndarray:
    """The plugin's small-segment removal: a median filter of the class numbers (ids + 1)."""
    k = int(small_segment // 2) * 2 + 1
    if k <= 1:
        return ids
    import cv2

    return cv2.medianBlur((ids + 1).astype(np.uint8), k).astype(ids.dtype) - 1


def deepness_class_ids(
    predict_batch: Callable[[np.ndarray], np.ndarray],
    rgb: np.ndarray,
    tile: int,
    overlap_percent: float,
    seg_thresh: float = 0.0,
    small_segment: int = 0,
    batch_size: int = 1,
) -> np.ndarray:
    """Class ids (h, w) int64 of an (h, w, C) raster (RGB 0..255 for an RGB model), tiled as the
    plugin tiles it.

    ``predict_batch`` maps (B, S, S, C) tiles to (B, K, S, S) probabilities (for instance
    :meth:`OnnxSegmenter.predict_batch`, whose normalisation is the plugin's standardisation).
    """
    h, w = rgb.shape[:2]
    g = deepness_grid(h, w, tile, overlap_percent)
    image = np.zeros((g.padded_height, g.padded_width, rgb.shape[2]), rgb.dtype)
    image[g.top : g.top + h, :w] = rgb
    full = np.zeros((g.padded_height, g.padded_width), np.int64)
    boxes = [(i, j) for i in range(g.rows) for j in range(g.cols)]
    for b in range(0, len(boxes), max(1, int(batch_size))):
        chunk = boxes[b : b + max(1, int(batch_size))]
        tiles = np.stack([image[i * g.stride :][:tile, j * g.stride :][:, :tile] for i, j in chunk])
        for (i, j), ids in zip(chunk, threshold_argmax(predict_batch(tiles), seg_thresh)):
            (y0, y1), (x0, x1) = _paste_range(i, g.rows, g), _paste_range(j, g.cols, g)
            oy, ox = i * g.stride, j * g.stride
            full[y0:y1, x0:x1] = ids[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
    full = median_filter_ids(full, small_segment)
    return full[g.top : g.top + h, :w]
