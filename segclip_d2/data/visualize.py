"""Colour maps, overlays and legends of class-id predictions."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import cv2
import numpy as np

from .dataset_facts import IGNORE_LABEL, prompt_name

# Colour of no-data / ignored pixels in colour images.
NODATA_COLOR = (0, 0, 0)


def palette_lut(colors: Sequence[Sequence[int]], nodata_color=NODATA_COLOR) -> np.ndarray:
    """A (256, 3) uint8 lookup table: class ``i`` -> ``colors[i]``, everything else -> nodata."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:] = nodata_color
    lut[: len(colors)] = np.asarray(colors, dtype=np.uint8).reshape(-1, 3)
    return lut


def colorize(ids: np.ndarray, colors: Sequence[Sequence[int]]) -> np.ndarray:
    """Class ids (H, W) uint8 -> RGB (H, W, 3) uint8."""
    return palette_lut(colors)[ids]


def overlay(rgb: np.ndarray, color: np.ndarray, ids: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the colour map over the image; no-data pixels (``IGNORE_LABEL``) show the image."""
    out = (rgb.astype(np.float32) * (1 - alpha) + color.astype(np.float32) * alpha).round()
    out = out.astype(np.uint8)
    nodata = ids == IGNORE_LABEL
    out[nodata] = rgb[nodata]
    return out


def vocabulary_colors(
    names: Sequence[str], known_names: Sequence[str], known_colors: Sequence[Sequence[int]]
) -> list[tuple[int, int, int]]:
    """Colours of a custom vocabulary: a name of the dataset keeps its dataset colour, others get
    distinct deterministic colours (golden-ratio hues)."""
    known = {
        prompt_name(n).lower(): tuple(int(v) for v in c) for n, c in zip(known_names, known_colors)
    }
    out = []
    hue = 0.0
    for n in names:
        c = known.get(prompt_name(n).lower())
        if c is None:
            hue = (hue + 0.618033988749895) % 1.0
            r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
            c = (round(r * 255), round(g * 255), round(b * 255))
        out.append(c)
    return out


def draw_legend(
    names: Sequence[str], colors: Sequence[Sequence[int]], title: str = ""
) -> np.ndarray:
    """An RGB (H, W, 3) uint8 legend: one colour swatch + class id and name per row."""
    row, pad, swatch = 28, 10, 20
    font, scale, thick = cv2.FONT_HERSHEY_SIMPLEX, 0.55, 1
    labels = [f"{i}: {n}" for i, n in enumerate(names)] + [f"{IGNORE_LABEL}: no data"]
    all_colors = [tuple(int(v) for v in c) for c in colors] + [NODATA_COLOR]
    text_w = max(cv2.getTextSize(t, font, scale, thick)[0][0] for t in labels + [title])
    top = row if title else 0
    img = np.full((top + row * len(labels) + pad, pad * 3 + swatch + text_w, 3), 255, np.uint8)
    if title:
        cv2.putText(img, title, (pad, row - 8), font, scale, (0, 0, 0), thick, cv2.LINE_AA)
    for i, (t, c) in enumerate(zip(labels, all_colors)):
        y = top + pad + i * row
        cv2.rectangle(img, (pad, y), (pad + swatch, y + swatch), c, -1)
        cv2.rectangle(img, (pad, y), (pad + swatch, y + swatch), (0, 0, 0), 1)
        cv2.putText(
            img, t, (pad * 2 + swatch, y + swatch - 4), font, scale, (0, 0, 0), thick, cv2.LINE_AA
        )
    return img
