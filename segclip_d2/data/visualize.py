"""Colour maps, overlays and legends of class-id predictions."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

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


# Fonts tried for legend text, in order: a covering font named by fontconfig is looked up too.
LEGEND_FONT_NAMES = ("DejaVu Sans", "Noto Sans", "Liberation Sans")


def _font_covers(path: str, text: str) -> bool:
    """Whether the TrueType/OpenType font at ``path`` has a glyph for every character of
    ``text`` (its character map, read with fontTools)."""
    try:
        from fontTools.ttLib import TTFont

        with TTFont(path, lazy=True, fontNumber=0) as font:
            cmap = font.getBestCmap() or {}
    except Exception:  # noqa: BLE001 - unreadable font file: not usable
        return False
    return all(ord(c) in cmap for c in text if not c.isspace())


def _candidate_fonts(text: str):
    """Font files that may draw ``text``: fontconfig's match for its characters and for the
    usual sans fonts, then matplotlib's bundled DejaVu Sans (lazily: the first that covers
    ``text`` ends the search)."""
    import shutil
    import subprocess

    if shutil.which("fc-match"):
        chars = sorted({f"{ord(c):x}" for c in text if not c.isspace()})
        patterns = [f":charset={' '.join(chars)}"] if chars else []
        for pattern in patterns + list(LEGEND_FONT_NAMES):
            try:
                res = subprocess.run(
                    ["fc-match", "-f", "%{file}", pattern],
                    capture_output=True,
                    text=True,
                    timeout=10,
                )
            except (OSError, subprocess.SubprocessError):
                break
            if res.returncode == 0 and res.stdout.strip():
                yield res.stdout.strip()
    try:
        import matplotlib

        yield f"{matplotlib.get_data_path()}/fonts/ttf/DejaVuSans.ttf"
    except ImportError:
        pass


def legend_font(text: str) -> str | None:
    """A font file covering every character of ``text``, or ``None``."""
    return next((f for f in _candidate_fonts(text) if _font_covers(f, text)), None)


def draw_legend(
    names: Sequence[str], colors: Sequence[Sequence[int]], title: str = ""
) -> np.ndarray:
    """An RGB (H, W, 3) uint8 legend: one colour swatch + class id and name per row, drawn with
    a font that covers the names (PIL). When no font on the machine covers them, the rows show
    class ids only, with a warning (never "??" boxes)."""
    import logging

    from PIL import Image, ImageDraw, ImageFont

    labels = [f"{i}: {n}" for i, n in enumerate(names)] + [f"{IGNORE_LABEL}: no data"]
    path = legend_font("".join(labels) + title)
    if path is None:
        logging.getLogger(__name__).warning(
            "legend.png: no font on this machine draws every class name (%s); the legend shows "
            "class ids only (install a font covering them, e.g. Noto)",
            ", ".join(repr(n) for n in names if not str(n).isascii())[:200] or "ASCII names",
        )
        labels = [f"{i}" for i in range(len(names))] + [f"{IGNORE_LABEL}: no data"]
        title = title if title.isascii() else ""
        path = legend_font("".join(labels) + title)
    font = ImageFont.truetype(path, 15) if path else ImageFont.load_default()
    row, pad, swatch = 28, 10, 20
    all_colors = [tuple(int(v) for v in c) for c in colors] + [NODATA_COLOR]
    text_w = max(int(font.getlength(t)) for t in labels + [title])
    top = row if title else 0
    img = Image.new("RGB", (pad * 3 + swatch + text_w, top + row * len(labels) + pad), "white")
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((pad, row - 8), title, fill=(0, 0, 0), font=font, anchor="ls")
    for i, (t, c) in enumerate(zip(labels, all_colors)):
        y = top + pad + i * row
        draw.rectangle((pad, y, pad + swatch, y + swatch), fill=c, outline=(0, 0, 0))
        draw.text((pad * 2 + swatch, y + swatch - 4), t, fill=(0, 0, 0), font=font, anchor="ls")
    return np.asarray(img)
