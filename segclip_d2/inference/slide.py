"""Sliding-window inference: class probabilities of overlapping windows blended per pixel.

Overlaps are combined with a weight that tapers towards each window's edges (``blend="cosine"`` or
``"linear"``), so a pixel near one window's border, where that window saw little context, takes
most of its value from the window that has it near its centre; ``"flat"`` is the plain mean.
Window edges lying on the image border are not tapered (no other window covers them).

Only K-channel class probabilities of one window batch exist at a time, plus two full-size
accumulators (the weighted sum ``(K, H, W)`` and the weight sum ``(1, H, W)``); per-query masks at
full resolution are never built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# run_batch(images (B, 3, h, w)) -> (B, K, h, w) float32
BatchFn = Callable[[torch.Tensor], torch.Tensor]


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


def taper_1d(length: int, ramp: int, blend: str, left: bool, right: bool) -> torch.Tensor:
    """Weights (length,) rising over ``ramp`` pixels from the tapered ends to 1.

    ``left``/``right`` say which ends are tapered (an end on the image border is not).
    """
    if blend not in BLENDS:
        raise ValueError(f"unknown TEST.SLIDE.BLEND {blend!r}; choose one of {BLENDS}")
    w = torch.ones(length, dtype=torch.float32)
    ramp = min(int(ramp), length // 2)
    if blend == "flat" or ramp <= 0:
        return w
    # t runs over the ramp's pixel centres in (0, 1).
    t = (torch.arange(ramp, dtype=torch.float32) + 0.5) / ramp
    r = t if blend == "linear" else 0.5 - 0.5 * torch.cos(torch.pi * t)
    r = r.clamp_min(_MIN_WEIGHT)
    if left:
        w[:ramp] = r
    if right:
        w[length - ramp :] = r.flip(0)
    return w


def window_weight(
    box: tuple[int, int, int, int], height: int, width: int, overlap: tuple[int, int], blend: str
) -> torch.Tensor:
    """Blending weight (h, w) of window ``box`` = (y, x, h, w) in an image of (height, width):
    tapered over ``overlap`` pixels on the sides that are inside the image."""
    y, x, h, w = box
    wy = taper_1d(h, overlap[0], blend, y > 0, y + h < height)
    wx = taper_1d(w, overlap[1], blend, x > 0, x + w < width)
    return wy[:, None] * wx[None, :]


def window_boxes(
    height: int, width: int, crop_size: Sequence[int], stride: Sequence[int]
) -> list[tuple[int, int, int, int]]:
    """Windows ``(y0, x0, h, w)`` of one image; all windows have the same size
    ``(min(crop_h, H), min(crop_w, W))`` so they can be batched."""
    ch, cw = min(int(crop_size[0]), height), min(int(crop_size[1]), width)
    sh, sw = min(int(stride[0]), ch), min(int(stride[1]), cw)
    return [
        (y, x, ch, cw) for y in window_starts(height, ch, sh) for x in window_starts(width, cw, sw)
    ]


def slide_inference(
    run_batch: BatchFn,
    image: torch.Tensor,
    crop_size: Sequence[int],
    stride: Sequence[int],
    batch_size: int,
    blend: str = "flat",
) -> torch.Tensor:
    """Class probabilities of ``image`` (3, H, W) by overlapping windows -> (K, H, W) float32.

    Windows run ``batch_size`` at a time through ``run_batch``; each pixel gets the weighted mean
    of the probabilities of the windows covering it, weights tapering (``blend``) over the overlap
    ``crop - stride`` towards window edges inside the image. With a crop covering the whole image
    this is one call on the whole image, identical to whole-image inference.
    """
    assert image.dim() == 3, f"expected (3, H, W), got {tuple(image.shape)}"
    _, height, width = image.shape
    boxes = window_boxes(height, width, crop_size, stride)
    ch, cw = boxes[0][2], boxes[0][3]
    overlap = (ch - min(int(stride[0]), ch), cw - min(int(stride[1]), cw))
    total = None  # (K, H, W)
    count = torch.zeros((1, height, width), dtype=torch.float32, device=image.device)
    batch_size = max(1, int(batch_size))
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i : i + batch_size]
        crops = torch.stack([image[:, y : y + h, x : x + w] for y, x, h, w in chunk])
        probs = run_batch(crops)  # (b, K, h, w)
        if total is None:
            total = torch.zeros(
                (probs.shape[1], height, width), dtype=torch.float32, device=image.device
            )
        for (y, x, h, w), p in zip(chunk, probs):
            wt = window_weight((y, x, h, w), height, width, overlap, blend).to(p.device)
            total[:, y : y + h, x : x + w] += p * wt
            count[:, y : y + h, x : x + w] += wt
    return total / count
