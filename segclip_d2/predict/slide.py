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

from .windows import BLENDS, taper_1d, window_starts, window_weight  # noqa: F401

# run_batch(images (B, 3, h, w)) -> (B, K, h, w) float32
BatchFn = Callable[[torch.Tensor], torch.Tensor]


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
            wt = torch.from_numpy(window_weight((y, x, h, w), height, width, overlap, blend)).to(
                p.device
            )
            total[:, y : y + h, x : x + w] += p * wt
            count[:, y : y + h, x : x + w] += wt
    return total / count
