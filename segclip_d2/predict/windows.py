"""Window geometry and blending weights shared by sliding-window inference, the demo's blocks and
the ONNX predictor; numpy only, so the torch-free deployment path can use it."""

from __future__ import annotations

import numpy as np


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Start offsets of windows of length ``crop`` covering ``[0, size)`` with step ``stride``.

    The last window is shifted back so it ends at the border (never runs past it); a size not
    larger than the crop gives one window at 0.

    >>> window_starts(1024, 512, 341)
    [0, 341, 512]
    """
    if crop <= 0 or stride <= 0:
        raise ValueError(f"crop ({crop}) and stride ({stride}) must be positive")
    if stride > crop:
        raise ValueError(f"stride {stride} > crop {crop} would leave pixels uncovered")
    if size <= crop:
        return [0]
    starts = list(range(0, size - crop, stride))
    starts.append(size - crop)
    return starts


BLENDS = ("flat", "linear", "cosine")
# Smallest taper weight: keeps every pixel's weight positive where only a window edge covers it.
_MIN_WEIGHT = 1e-3


def taper_1d(length: int, ramp: int, blend: str, left: bool, right: bool) -> np.ndarray:
    """Weights (length,) rising over ``ramp`` pixels from the tapered ends to 1.

    ``left``/``right`` say which ends are tapered (an end on the image border is not).
    """
    if blend not in BLENDS:
        raise ValueError(f"unknown TEST.SLIDE.BLEND {blend!r}; choose one of {BLENDS}")
    w = np.ones(length, dtype=np.float32)
    ramp = min(int(ramp), length // 2)
    if blend == "flat" or ramp <= 0:
        return w
    # t runs over the ramp's pixel centres in (0, 1).
    t = (np.arange(ramp, dtype=np.float32) + np.float32(0.5)) / np.float32(ramp)
    r = (
        t
        if blend == "linear"
        else np.float32(0.5) - np.float32(0.5) * np.cos(np.float32(np.pi) * t)
    )
    r = np.maximum(r, np.float32(_MIN_WEIGHT)).astype(np.float32)
    if left:
        w[:ramp] = r
    if right:
        w[length - ramp :] = r[::-1]
    return w


def window_weight(
    box: tuple[int, int, int, int], height: int, width: int, overlap: tuple[int, int], blend: str
) -> np.ndarray:
    """Blending weight (h, w) of window ``box`` = (y, x, h, w) in an image of (height, width):
    tapered over ``overlap`` pixels on the sides that are inside the image."""
    y, x, h, w = box
    wy = taper_1d(h, overlap[0], blend, y > 0, y + h < height)
    wx = taper_1d(w, overlap[1], blend, x > 0, x + w < width)
    return wy[:, None] * wx[None, :]
