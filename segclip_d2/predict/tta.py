"""Test-time augmentation views: flips, 90-degree rotations and scales, each exactly invertible.

The view set is ``scales x ({identity} + flips + rotations)``: with FLIPS ["h", "v"],
ROTATIONS [90, 180, 270] and SCALES [1.0] that is 6 views. Every view's class probabilities are
mapped back to the original pixel grid (inverse flip / rotation exactly, inverse scale by bilinear
resize) and averaged.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class View:
    """One augmented view: optional flip ("h" = left-right, "v" = up-down), then ``quarter_turns``
    counter-clockwise 90-degree rotations, then resize by ``scale``."""

    flip: str | None = None
    quarter_turns: int = 0
    scale: float = 1.0

    @property
    def is_identity(self) -> bool:
        return self.flip is None and self.quarter_turns % 4 == 0 and self.scale == 1.0

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        """(C, H, W) -> (C, h, w) view of the image."""
        x = image
        if self.flip == "h":
            x = torch.flip(x, dims=[-1])
        elif self.flip == "v":
            x = torch.flip(x, dims=[-2])
        if self.quarter_turns % 4:
            x = torch.rot90(x, self.quarter_turns, dims=(-2, -1))
        if self.scale != 1.0:
            h, w = x.shape[-2:]
            size = (max(1, round(h * self.scale)), max(1, round(w * self.scale)))
            x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
        return x

    def invert(self, probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Map (K, h, w) predictions of this view back to the original (K, H, W) grid."""
        x = probs
        if self.quarter_turns % 4:
            x = torch.rot90(x, -self.quarter_turns, dims=(-2, -1))
        if self.flip == "h":
            x = torch.flip(x, dims=[-1])
        elif self.flip == "v":
            x = torch.flip(x, dims=[-2])
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
        return x


def build_views(
    flips: Iterable[str] = (), rotations: Iterable[int] = (), scales: Iterable[float] = (1.0,)
) -> list[View]:
    """The TTA views; the identity view at scale 1.0 is always first. Duplicates are dropped."""
    geo: list[View] = [View()]
    for f in flips:
        f = str(f).lower()
        if f not in ("h", "v"):
            raise ValueError(f"unknown TTA flip {f!r}; use 'h' (horizontal) or 'v' (vertical)")
        geo.append(View(flip=f))
    for r in rotations:
        r = int(r)
        if r % 90:
            raise ValueError(f"TTA rotation {r} is not a multiple of 90 degrees")
        geo.append(View(quarter_turns=(r // 90) % 4))
    all_scales = [1.0] + [float(s) for s in scales]
    views: list[View] = []
    for s in all_scales:
        if s <= 0:
            raise ValueError(f"TTA scale must be positive, got {s}")
        for g in geo:
            v = View(flip=g.flip, quarter_turns=g.quarter_turns, scale=s)
            if v not in views:
                views.append(v)
    return views
