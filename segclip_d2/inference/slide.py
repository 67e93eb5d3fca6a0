"""Sliding-window inference: class probabilities of overlapping windows averaged per pixel.

Only K-channel class probabilities of one window batch exist at a time, plus two full-size
accumulators (the running sum ``(K, H, W)`` and the window count ``(1, H, W)``); per-query masks at
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
) -> torch.Tensor:
    """Class probabilities of ``image`` (3, H, W) by overlapping windows -> (K, H, W) float32.

    Windows run ``batch_size`` at a time through ``run_batch``; each pixel gets the mean of the
    probabilities of the windows covering it. With a crop covering the whole image this is one
    call on the whole image, identical to whole-image inference.
    """
    assert image.dim() == 3, f"expected (3, H, W), got {tuple(image.shape)}"
    _, height, width = image.shape
    boxes = window_boxes(height, width, crop_size, stride)
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
            total[:, y : y + h, x : x + w] += p
            count[:, y : y + h, x : x + w] += 1.0
    return total / count
