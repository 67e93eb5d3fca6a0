"""The built-in synthetic aerial dataset: procedurally generated tiles with LoveDA's seven classes.

Every tile is drawn from a seed, so the dataset is the same on every machine. A tile is composed
like a real land-cover scene: a partition of the ground into fields, bare soil, forest and
low-texture clutter; forest and water blobs and rivers on top; roads as long thin lines and curves;
buildings as rectangles with gabled or flat roofs and cast shadows. The classes overlap in colour
(brown roofs and ploughed fields look like bare soil, green fields like forest, water is as dark
as shadows and forest, grey roofs like asphalt) and every tile gets its own illumination, colour
cast, haze, blur and sensor noise, so colour alone does not separate the classes: the row texture
of fields, the canopy texture of forest, the smoothness of water, the thin shape of roads and the
rectangles of buildings do.

The scale is fixed in pixels (about one ground metre per pixel): a smaller ``size`` is a smaller
piece of ground, not a shrunken scene.

On-disk layout (the prepared layout read by :mod:`segclip_d2.data.register`)::

    <root>/synthetic_aerial/{train,val}/images/<split>_<index>.png   RGB
    <root>/synthetic_aerial/{train,val}/labels/<split>_<index>.png   train ids, 255 = no data
    <root>/synthetic_aerial/meta.json                               completion marker (last)

With ``nir=True`` (:func:`ensure_synthetic_aerial`, :func:`generate_tile`) every tile also gets a
near-infrared band (:data:`NIR_RANGES`: bright vegetation, dark water, moderate soil, roads and
roofs), stored as 4-band TIFFs (red, green, blue, nir) in ``<root>/synthetic_aerial_nir``. The
visible bands and labels are the very same as the RGB set's: the NIR band is drawn from the tile's
random stream after everything else, so the RGB set does not change.

:func:`ensure_synthetic_aerial` generates the set on first use. Its defaults can be changed with
environment variables (explicit arguments win):

=================================  =======  ===========================================
variable                           default  meaning
=================================  =======  ===========================================
``SEGCLIP_SYNTHETIC_NUM_TRAIN``    64       training tiles
``SEGCLIP_SYNTHETIC_NUM_VAL``      16       validation tiles
``SEGCLIP_SYNTHETIC_SIZE``         512      tile side in pixels
``SEGCLIP_SYNTHETIC_SEED``         0        base seed
=================================  =======  ===========================================
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ..utils.atomic import atomic_output
from .dataset_facts import IGNORE_LABEL, get_facts

try:  # POSIX file locks; elsewhere concurrent generation is not guarded.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

logger = logging.getLogger(__name__)

FACTS = get_facts("synthetic_aerial")
DATASET_DIR = "synthetic_aerial"
DATASET_DIR_NIR = "synthetic_aerial_nir"
RGB_BANDS = ("red", "green", "blue")
NIR_BANDS = (*RGB_BANDS, "nir")
SPLITS = ("train", "val")
# Bump when the generator changes what a seed produces: existing sets are then regenerated.
GENERATOR_VERSION = 2
MARKER_NAME = "meta.json"
PROGRESS_NAME = ".generating.json"
LOCK_NAME = ".lock"
DEFAULTS = {"num_train": 64, "num_val": 16, "size": 512, "seed": 0}
ENV_VARS = {
    "num_train": "SEGCLIP_SYNTHETIC_NUM_TRAIN",
    "num_val": "SEGCLIP_SYNTHETIC_NUM_VAL",
    "size": "SEGCLIP_SYNTHETIC_SIZE",
    "seed": "SEGCLIP_SYNTHETIC_SEED",
}
MIN_SIZE = 32
SCENES = ("rural", "urban")

_ID = {name: i for i, name in enumerate(FACTS.classes)}
BACKGROUND = _ID["background"]
BUILDING = _ID["building"]
ROAD = _ID["road"]
WATER = _ID["water"]
BARREN = _ID["barren"]
FOREST = _ID["forest"]
AGRICULTURE = _ID["agriculture"]

# Base colours (RGB) per class, deliberately overlapping between classes.
PALETTES: dict[int, np.ndarray] = {
    BACKGROUND: np.array(
        [[122, 126, 100], [142, 136, 116], [104, 118, 82], [156, 150, 138], [118, 112, 96]],
        dtype=np.float32,
    ),
    AGRICULTURE: np.array(
        [
            [96, 132, 62],
            [128, 158, 80],
            [188, 174, 112],
            [142, 112, 82],
            [168, 158, 128],
            [70, 100, 52],
        ],
        dtype=np.float32,
    ),
    FOREST: np.array(
        [[46, 76, 42], [62, 88, 46], [38, 62, 42], [72, 88, 52], [56, 74, 58]], dtype=np.float32
    ),
    BARREN: np.array(
        [[166, 142, 110], [142, 116, 90], [182, 170, 150], [122, 110, 98], [150, 132, 100]],
        dtype=np.float32,
    ),
    WATER: np.array(
        [[32, 52, 72], [42, 66, 60], [72, 86, 82], [56, 72, 52], [28, 38, 44], [50, 70, 88]],
        dtype=np.float32,
    ),
    ROAD: np.array(
        [[96, 96, 96], [122, 120, 116], [160, 158, 150], [152, 132, 104], [80, 82, 86]],
        dtype=np.float32,
    ),
    BUILDING: np.array(
        [
            [178, 178, 176],
            [98, 100, 104],
            [164, 92, 72],
            [150, 122, 92],
            [214, 212, 206],
            [112, 132, 160],
            [120, 116, 100],
        ],
        dtype=np.float32,
    ),
}
# Probability of each base colour (same order as PALETTES).
PALETTE_WEIGHTS: dict[int, np.ndarray] = {
    BACKGROUND: np.array([0.3, 0.25, 0.2, 0.15, 0.1]),
    AGRICULTURE: np.array([0.22, 0.16, 0.2, 0.2, 0.12, 0.1]),
    FOREST: np.array([0.3, 0.25, 0.2, 0.15, 0.1]),
    BARREN: np.array([0.3, 0.25, 0.15, 0.15, 0.15]),
    WATER: np.array([0.25, 0.25, 0.15, 0.15, 0.1, 0.1]),
    ROAD: np.array([0.3, 0.25, 0.15, 0.2, 0.1]),
    BUILDING: np.array([0.22, 0.15, 0.18, 0.15, 0.1, 0.1, 0.1]),
}
# Share of each land-cover class in the ground partition, per scene type.
COVER_PROBS = {
    "rural": {AGRICULTURE: 0.5, BACKGROUND: 0.14, BARREN: 0.22, FOREST: 0.14},
    "urban": {BACKGROUND: 0.5, BARREN: 0.22, AGRICULTURE: 0.14, FOREST: 0.14},
}


# ---------------------------------------------------------------------------------------- noise
def _noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth noise (h, w) float32, zero mean and unit std, with features about ``cell`` px."""
    cell = max(1, int(round(cell)))
    if cell == 1:
        return rng.standard_normal((h, w), dtype=np.float32)
    gh, gw = h // cell + 4, w // cell + 4
    grid = rng.standard_normal((gh, gw), dtype=np.float32)
    up = cv2.resize(grid, (gw * cell, gh * cell), interpolation=cv2.INTER_CUBIC)
    oy, ox = (int(v) for v in rng.integers(cell, 2 * cell, size=2))
    out = up[oy : oy + h, ox : ox + w]
    out = out - out.mean()
    return out / (out.std() + 1e-6)


def _fbm(rng: np.random.Generator, h: int, w: int, cell: float, octaves: int = 3) -> np.ndarray:
    """Fractal noise (h, w): octaves of :func:`_noise` halving in size and amplitude."""
    out = np.zeros((h, w), np.float32)
    amp = 1.0
    for _ in range(octaves):
        out += amp * _noise(rng, h, w, cell)
        cell /= 2
        amp /= 2
    return out / (out.std() + 1e-6)


def _top_fraction(values: np.ndarray, frac: float) -> np.ndarray:
    """Boolean mask of the ``frac`` largest values (threshold from a strided subsample)."""
    sample = values[::4, ::4]
    return values > np.quantile(sample, 1.0 - frac)


# ---------------------------------------------------------------------------------------- canvas
@dataclass
class _Canvas:
    """A tile under construction: labels, region ids and the per-region rendering parameters."""

    h: int
    w: int
    label: np.ndarray = field(init=False)  # (H, W) uint8 train ids
    region: np.ndarray = field(init=False)  # (H, W) int32 index into the lists below
    colors: list = field(default_factory=list)  # per region (3,) RGB
    params: list = field(default_factory=list)  # per region (theta, period, amplitude, phase)
    classes: list = field(default_factory=list)  # per region, its class

    def __post_init__(self):
        self.label = np.full((self.h, self.w), BACKGROUND, np.uint8)
        self.region = np.zeros((self.h, self.w), np.int32)

    def new_region(self, rng: np.random.Generator, cls: int, params=(0.0, 1.0, 0.0, 0.0)) -> int:
        pal = PALETTES[cls]
        base = pal[rng.choice(len(pal), p=PALETTE_WEIGHTS[cls])]
        self.colors.append(np.clip(base + rng.uniform(-12, 12, 3), 0, 255))
        self.params.append(params)
        self.classes.append(cls)
        return len(self.colors) - 1

    def paint(self, mask: np.ndarray, cls: int, region: int) -> None:
        self.label[mask] = cls
        self.region[mask] = region


def _poly_mask(h: int, w: int, pts: np.ndarray, thickness: int, closed: bool = False):
    """Mask (H, W) bool of a polyline ``pts`` (N, 2) as (x, y) drawn ``thickness`` px wide."""
    mask = np.zeros((h, w), np.uint8)
    cv2.polylines(mask, [np.round(pts).astype(np.int32)], closed, 1, int(thickness), cv2.LINE_8)
    return mask.astype(bool)


def _curvy_path(rng: np.random.Generator, h: int, w: int, turn: float = 0.05) -> np.ndarray:
    """A smooth random path (N, 2) as (x, y) entering at one border and leaving the tile."""
    side = int(rng.integers(4))
    t = rng.uniform(0.1, 0.9)
    start = [(t * w, -5.0), (w + 5.0, t * h), (t * w, h + 5.0), (-5.0, t * h)][side]
    centre = np.array([w / 2, h / 2]) + rng.uniform(-0.3, 0.3, 2) * [w, h]
    heading = np.arctan2(centre[1] - start[1], centre[0] - start[0])
    step = 8.0
    n = int(3 * (h + w) / step)
    # Turn rate is a smoothed random walk: long, gently bending curves.
    rate = np.convolve(rng.normal(0, turn, n + 8), np.ones(8) / 8, mode="valid")[:n]
    headings = heading + np.cumsum(rate)
    pts = np.array(start) + np.cumsum(step * np.stack([np.cos(headings), np.sin(headings)], 1), 0)
    pts = np.vstack([start, pts])
    inside = (pts[:, 0] > -20) & (pts[:, 0] < w + 20) & (pts[:, 1] > -20) & (pts[:, 1] < h + 20)
    # Keep the path up to the first time it leaves the tile.
    first_out = np.argmax(~inside[1:]) + 1 if (~inside[1:]).any() else len(pts)
    return pts[: first_out + 1]


def _straight_path(point: np.ndarray, angle: float, length: float) -> np.ndarray:
    d = np.array([np.cos(angle), np.sin(angle)])
    ts = np.linspace(-length, length, int(2 * length / 8) + 2)
    return point[None, :] + ts[:, None] * d[None, :]


# ---------------------------------------------------------------------------------------- layers
def _paint_land_cover(rng: np.random.Generator, cv: _Canvas, scene: str) -> None:
    """Partition the ground into Voronoi patches of agriculture, background, barren and forest."""
    h, w = cv.h, cv.w
    cell = rng.uniform(100, 150) if scene == "rural" else rng.uniform(120, 180)
    n = max(2, int(round(h * w / cell**2 * rng.uniform(0.8, 1.25))))
    seeds = rng.uniform(-0.1, 1.1, (n, 2)) * [w, h]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    warp = rng.uniform(2, 6)
    xw = xx + warp * _noise(rng, h, w, 40)
    yw = yy + warp * _noise(rng, h, w, 40)
    best = np.full((h, w), np.inf, np.float32)
    owner = np.zeros((h, w), np.int32)
    for i, (sx, sy) in enumerate(seeds):
        d = (xw - sx) ** 2 + (yw - sy) ** 2
        closer = d < best
        best[closer] = d[closer]
        owner[closer] = i
    probs = COVER_PROBS[scene]
    classes = list(probs)
    p = np.array([probs[c] for c in classes])
    lut_cls = np.zeros(n, np.uint8)
    lut_region = np.zeros(n, np.int32)
    for i in range(n):
        cls = classes[rng.choice(len(classes), p=p)]
        params = (0.0, 1.0, 0.0, 0.0)
        if cls == AGRICULTURE:
            faint = rng.random() < 0.15
            params = (
                rng.uniform(0, np.pi),  # row direction
                rng.uniform(8, 16),  # row period (px): survives a 0.5x resize
                rng.uniform(4, 8) if faint else rng.uniform(12, 26),  # row contrast
                rng.uniform(0, 2 * np.pi),
            )
        lut_cls[i] = cls
        lut_region[i] = cv.new_region(rng, cls, params)
    cv.label[:] = lut_cls[owner]
    cv.region[:] = lut_region[owner]


def _paint_forest(rng: np.random.Generator, cv: _Canvas, scene: str) -> None:
    frac = rng.uniform(0.06, 0.28) if scene == "rural" else rng.uniform(0.02, 0.1)
    mask = _top_fraction(_fbm(rng, cv.h, cv.w, rng.uniform(60, 100), 3), frac)
    cv.paint(mask, FOREST, cv.new_region(rng, FOREST))


def _paint_water(rng: np.random.Generator, cv: _Canvas, scene: str) -> None:
    if rng.random() > (0.8 if scene == "rural" else 0.55):
        return
    if rng.random() < 0.55:  # lake or pond: a smooth blob
        frac = rng.uniform(0.06, 0.25)
        mask = _top_fraction(_fbm(rng, cv.h, cv.w, rng.uniform(110, 160), 2), frac)
    else:  # river
        path = _curvy_path(rng, cv.h, cv.w, turn=0.04)
        mask = _poly_mask(cv.h, cv.w, path, int(rng.integers(18, 44)))
        mask = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    cv.paint(mask, WATER, cv.new_region(rng, WATER))


@dataclass
class _Road:
    path: np.ndarray  # (N, 2) (x, y)
    width: int


def _paint_roads(rng: np.random.Generator, cv: _Canvas, scene: str) -> tuple[list, float]:
    """Draw roads; return them (buildings line up along them) and the scene's grid angle."""
    h, w = cv.h, cv.w
    roads: list[_Road] = []
    grid_angle = rng.uniform(0, np.pi)
    scale = np.sqrt(h * w) / 512
    if scene == "urban":
        spacing = rng.uniform(110, 170)
        centre = np.array([w / 2, h / 2]) + rng.uniform(-0.5, 0.5, 2) * spacing
        reach = 0.75 * np.hypot(h, w)
        for angle, keep in ((grid_angle, 1.0), (grid_angle + np.pi / 2, 0.75)):
            normal = np.array([-np.sin(angle), np.cos(angle)])
            for k in range(-int(reach // spacing) - 1, int(reach // spacing) + 2):
                if rng.random() > keep:
                    continue
                offset = (k + rng.uniform(-0.15, 0.15)) * spacing
                path = _straight_path(centre + offset * normal, angle, reach)
                roads.append(_Road(path, int(rng.integers(8, 15))))
        if rng.random() < 0.4:
            roads.append(_Road(_curvy_path(rng, h, w, 0.03), int(rng.integers(12, 20))))
    else:
        for _ in range(max(1, int(round(rng.integers(1, 4) * scale)))):
            roads.append(_Road(_curvy_path(rng, h, w, 0.05), int(rng.integers(6, 12))))
    for road in roads:
        mask = _poly_mask(h, w, road.path, road.width)
        cv.paint(mask, ROAD, cv.new_region(rng, ROAD))
    return roads, grid_angle


def _rect_corners(centre, along: float, length: float, depth: float) -> np.ndarray:
    """Corners (4, 2) of a rectangle ``length`` x ``depth`` rotated to direction ``along``."""
    u = np.array([np.cos(along), np.sin(along)]) * length / 2
    v = np.array([-np.sin(along), np.cos(along)]) * depth / 2
    return np.array([centre + u + v, centre - u + v, centre - u - v, centre + u - v])


_PROBE = np.array([(a, b) for a in (-0.55, 0.0, 0.55) for b in (-0.55, 0.0, 0.55)])


def _footprint_free(cv: _Canvas, centre, along, length, depth, margin: float = 3.0) -> bool:
    """True when a rectangle (with ``margin``) lies on ground without water, road or building."""
    u = np.array([np.cos(along), np.sin(along)])
    v = np.array([-np.sin(along), np.cos(along)])
    pts = (
        centre
        + _PROBE[:, :1] * 2 * (length / 2 + margin) * u
        + _PROBE[:, 1:] * 2 * (depth / 2 + margin) * v
    )
    xs, ys = np.round(pts[:, 0]).astype(int), np.round(pts[:, 1]).astype(int)
    inside = (xs >= 0) & (xs < cv.w) & (ys >= 0) & (ys < cv.h)
    if inside.sum() < 3:  # mostly outside the tile
        return False
    under = cv.label[ys[inside], xs[inside]]
    return not np.isin(under, (WATER, ROAD, BUILDING)).any()


def _building_sites(rng, cv: _Canvas, roads, grid_angle: float, scene: str) -> Iterator[tuple]:
    """Candidate (centre, angle, length, depth): rows along roads, then scattered ones."""
    urban = scene == "urban"
    for road in roads:
        seg = np.diff(road.path, axis=0)
        seg_len = np.hypot(seg[:, 0], seg[:, 1])
        arc = np.concatenate([[0.0], np.cumsum(seg_len)])
        if urban:
            stretches = [(0.0, arc[-1])]
        else:  # farmsteads: short clusters along the road
            stretches = []
            for _ in range(int(rng.integers(1, 4))):
                s0 = rng.uniform(0, max(arc[-1] - 60, 1))
                stretches.append((s0, s0 + rng.uniform(40, 110)))
        for s0, s1 in stretches:
            s = s0
            while s < s1:
                length = rng.uniform(16, 42) if urban else rng.uniform(12, 26)
                depth = rng.uniform(12, 28) if urban else rng.uniform(10, 20)
                if urban and rng.random() < 0.06:  # warehouse or block of flats
                    length, depth = rng.uniform(50, 90), rng.uniform(30, 50)
                i = min(int(np.searchsorted(arc, s)), len(seg) - 1)
                i = max(i, 0)
                d = seg[i] / max(seg_len[i], 1e-6)
                p = road.path[i] + d * (s - arc[i])
                along = float(np.arctan2(d[1], d[0]))
                normal = np.array([-d[1], d[0]])
                for side in (-1, 1):
                    if rng.random() < (0.85 if urban else 0.6):
                        setback = road.width / 2 + rng.uniform(3, 10) + depth / 2
                        yield p + side * setback * normal, along, length, depth
                        # A second row behind the first in dense blocks.
                        if urban and rng.random() < 0.45:
                            back = setback + depth / 2 + rng.uniform(4, 10) + depth / 2
                            yield p + side * back * normal, along, length, depth
                s += length + rng.uniform(4, 14)
    n_scatter = int(rng.integers(5, 20) if urban else rng.integers(0, 5))
    n_scatter = int(round(n_scatter * cv.h * cv.w / 512**2))
    for _ in range(n_scatter):
        centre = rng.uniform(0, 1, 2) * [cv.w, cv.h]
        yield centre, grid_angle + rng.normal(0, 0.1), rng.uniform(12, 30), rng.uniform(10, 22)


def _paint_buildings(rng, cv: _Canvas, image: np.ndarray, roads, grid_angle: float, scene: str):
    """Draw buildings (roofs with gables or flat borders) and their shadows into ``image``."""
    h, w = cv.h, cv.w
    sun = rng.uniform(0, 2 * np.pi)
    sun_dir = np.array([np.cos(sun), np.sin(sun)])
    shade = rng.uniform(0.42, 0.6)
    shadow = np.zeros((h, w), np.uint8)
    roofs = []
    for centre, along, length, depth in _building_sites(rng, cv, roads, grid_angle, scene):
        if not _footprint_free(cv, centre, along, length, depth):
            continue
        corners = _rect_corners(centre, along, length, depth)
        cv2.fillConvexPoly(cv.label, np.round(corners).astype(np.int32), BUILDING)
        height = rng.uniform(3, 9) * (1.8 if length > 48 else 1.0)
        cast = np.vstack([corners, corners + height * sun_dir])
        hull = cv2.convexHull(np.round(cast).astype(np.int32))
        cv2.fillConvexPoly(shadow, hull, 1)
        roofs.append((centre, along, length, depth, corners))
    ground = (shadow > 0) & (cv.label != BUILDING)
    image[ground] *= shade
    pal, pw = PALETTES[BUILDING], PALETTE_WEIGHTS[BUILDING]
    for centre, along, length, depth, corners in roofs:
        color = np.clip(pal[rng.choice(len(pal), p=pw)] + rng.uniform(-14, 14, 3), 0, 255)
        pts = np.round(corners).astype(np.int32)
        cv2.fillConvexPoly(image, pts, tuple(float(c) for c in color))
        if rng.random() < 0.6 and length < 60:  # gable: the half facing away is darker
            half = _rect_corners(
                centre + np.array([-np.sin(along), np.cos(along)]) * depth / 4,
                along,
                length,
                depth / 2,
            )
            dark = tuple(float(c) * rng.uniform(0.72, 0.85) for c in color)
            cv2.fillConvexPoly(image, np.round(half).astype(np.int32), dark)
        else:  # flat roof: parapet outline and a rooftop unit
            rim = tuple(float(c) * 0.8 for c in color)
            cv2.polylines(image, [pts], True, rim, 2, cv2.LINE_8)
            if length > 24 and rng.random() < 0.7:
                unit = _rect_corners(centre + rng.uniform(-4, 4, 2), along, 6, 5)
                cv2.fillConvexPoly(image, np.round(unit).astype(np.int32), rim)


def _add_clutter(rng: np.random.Generator, image: np.ndarray, label: np.ndarray, n: int) -> None:
    """``n`` bits of clutter (bushes, small paved or bare patches), drawn on background only."""
    h, w = label.shape
    clutter = np.zeros((h, w, 3), np.float32)
    clutter_mask = np.zeros((h, w), np.uint8)
    for _ in range(n):
        c = tuple(int(v) for v in rng.uniform(0, 1, 2) * [w, h])
        if rng.random() < 0.6:
            col = (rng.uniform(40, 80), rng.uniform(65, 100), rng.uniform(35, 60))
            radius = int(rng.integers(2, 6))
            cv2.circle(clutter, c, radius, col, -1)
            cv2.circle(clutter_mask, c, radius, 1, -1)
        else:
            half = rng.uniform(2, 7, 2)
            p0 = (int(c[0] - half[0]), int(c[1] - half[1]))
            p1 = (int(c[0] + half[0]), int(c[1] + half[1]))
            col = tuple(float(v) for v in rng.uniform(110, 180) + rng.uniform(-10, 10, 3))
            cv2.rectangle(clutter, p0, p1, col, -1)
            cv2.rectangle(clutter_mask, p0, p1, 1, -1)
    on = (clutter_mask > 0) & (label == BACKGROUND)
    image[on] = 0.3 * image[on] + 0.7 * clutter[on]


def _render_ground(rng: np.random.Generator, cv: _Canvas) -> np.ndarray:
    """Colour and texture every region: (H, W, 3) float32 RGB in 0..255."""
    h, w = cv.h, cv.w
    colors = np.array(cv.colors, np.float32)  # (R, 3)
    params = np.array(cv.params, np.float32)  # (R, 4)
    image = colors[cv.region]  # (H, W, 3)
    image *= (1.0 + 0.06 * _noise(rng, h, w, 150))[..., None]
    label = cv.label

    ys, xs = np.nonzero(label == AGRICULTURE)
    if len(ys):
        p = params[cv.region[ys, xs]]  # (P, 4)
        phase = (xs * np.cos(p[:, 0]) + ys * np.sin(p[:, 0])) / p[:, 1] * 2 * np.pi + p[:, 3]
        rows = p[:, 2] * np.sin(phase)  # crop rows
        patchy = 9.0 * _noise(rng, h, w, 60)[ys, xs]
        image[ys, xs] += (rows + patchy)[:, None] * np.array([1.0, 1.05, 0.8], np.float32)

    ys, xs = np.nonzero(label == FOREST)
    if len(ys):
        canopy = (0.7 * _noise(rng, h, w, 7) + 0.5 * _noise(rng, h, w, 3))[ys, xs]  # crowns
        factor = 1.0 + 0.3 * np.tanh(canopy)
        factor[canopy < -0.9] *= 0.55  # dark gaps between crowns
        image[ys, xs] *= factor[:, None]
        image[ys, xs, 1] += 6.0 * _noise(rng, h, w, 12)[ys, xs]

    ys, xs = np.nonzero(label == BARREN)
    if len(ys):
        grain = cv2.GaussianBlur(rng.standard_normal((h, w), dtype=np.float32), (0, 0), 0.8)
        grain /= grain.std() + 1e-6
        tex = 14.0 * grain[ys, xs] + 16.0 * _fbm(rng, h, w, 30, 2)[ys, xs]
        image[ys, xs] += tex[:, None]

    ys, xs = np.nonzero(label == BACKGROUND)
    if len(ys):
        tex = 10.0 * _noise(rng, h, w, 30)[ys, xs] + 5.0 * _noise(rng, h, w, 6)[ys, xs]
        image[ys, xs] += tex[:, None]
        _add_clutter(rng, image, label, int(len(ys) / 1800))

    ys, xs = np.nonzero(label == WATER)
    if len(ys):
        image[ys, xs] += 4.0 * _noise(rng, h, w, 120)[ys, xs, None]

    ys, xs = np.nonzero(label == ROAD)
    if len(ys):
        image[ys, xs] += (3.0 * _noise(rng, h, w, 20) + 2.5 * _noise(rng, h, w, 1))[ys, xs, None]
    return image


def _apply_sensor(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Per-tile illumination, colour cast, haze, optics blur and sensor noise -> uint8 RGB."""
    image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.5, 1.0))
    gain = rng.uniform(0.78, 1.22) * rng.uniform(0.95, 1.05, 3).astype(np.float32)
    image *= gain
    gamma = rng.uniform(0.85, 1.18)
    image = 255.0 * np.power(np.clip(image, 0, 255) / 255.0, gamma)
    haze = rng.uniform(0, 0.15)
    haze_color = np.array([172, 178, 186], np.float32) + rng.uniform(-8, 8, 3)
    image = (1 - haze) * image + haze * haze_color
    image += rng.normal(0, rng.uniform(2.0, 6.0), image.shape).astype(np.float32)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


# Near-infrared brightness (0..255 before the sensor) of each region, drawn per region from its
# class: vegetation reflects NIR strongly (chlorophyll's red edge), water absorbs it, soil, roads
# and roofs lie in between. Fields and background are vegetation when their colour is green
# (G > R), soil otherwise (ploughed fields, bare yards). Texture and shadows follow the visible
# luminance of each pixel relative to its region's base colour.
NIR_RANGES = {
    FOREST: (170, 215),
    AGRICULTURE: (150, 200),
    BACKGROUND: (125, 165),
    BARREN: (95, 130),
    ROAD: (65, 100),
    WATER: (10, 30),
}
NIR_SOIL_RANGE = (95, 125)  # fields and background whose colour is not green
NIR_ROOF_GAIN = 0.85  # roofs (painted, not regions): NIR = 0.85 x visible luminance
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def _relative_luminance(cv: _Canvas, image: np.ndarray) -> np.ndarray:
    """Per pixel (H, W): visible luminance over its region's base luminance; on roofs, the
    luminance itself (negative, to tell them apart). No random draws."""
    lum = image @ _LUMA  # (H, W)
    base = np.maximum(np.array(cv.colors, np.float32) @ _LUMA, 1.0)  # (R,)
    rel = np.clip(lum / base[cv.region], 0.0, 2.0)
    roof = cv.label == BUILDING
    rel[roof] = -lum[roof]
    return rel


def _nir_scene(rng: np.random.Generator, cv: _Canvas, rel: np.ndarray) -> np.ndarray:
    """The NIR band (H, W) float32 before the sensor, from :func:`_relative_luminance`."""
    colors = np.array(cv.colors, np.float32)
    level = np.empty(len(cv.classes), np.float32)
    for r, cls in enumerate(cv.classes):
        green = colors[r, 1] > colors[r, 0] + 4
        lo, hi = (
            NIR_RANGES[cls] if green or cls not in (AGRICULTURE, BACKGROUND) else NIR_SOIL_RANGE
        )
        level[r] = rng.uniform(lo, hi)
    nir = level[cv.region] * rel
    roof = rel < 0
    nir[roof] = NIR_ROOF_GAIN * -rel[roof]
    return nir


def _nir_sensor(rng: np.random.Generator, nir: np.ndarray) -> np.ndarray:
    """Optics blur, gain and sensor noise of the NIR band -> uint8."""
    nir = cv2.GaussianBlur(nir, (0, 0), rng.uniform(0.5, 1.0)) * rng.uniform(0.8, 1.2)
    nir += rng.normal(0, rng.uniform(2.0, 6.0), nir.shape).astype(np.float32)
    return np.clip(nir + 0.5, 0, 255).astype(np.uint8)


def _paint_nodata(rng: np.random.Generator, label: np.ndarray, image: np.ndarray) -> None:
    """A black no-data wedge along one border (label 255), like LoveDA's ignore area."""
    h, w = label.shape
    a, b = rng.uniform(10, 60, 2)
    # A band along the top border whose width goes from a to b, then rotated to a random side.
    band = np.array([[0, 0], [w, 0], [w, b], [0, a]], np.int32)
    mask = np.zeros((h, w), np.uint8)
    cv2.fillConvexPoly(mask, band, 1)
    mask = np.rot90(mask, int(rng.integers(4))) if h == w else mask
    on = mask > 0
    label[on] = IGNORE_LABEL
    image[on] = 0


def _as_rng(rng_or_seed) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    if rng_or_seed is None or isinstance(rng_or_seed, bool):
        raise TypeError("generate_tile needs an int seed, a SeedSequence or a numpy Generator")
    return np.random.default_rng(rng_or_seed)


def generate_tile(
    rng_or_seed,
    size: int = 512,
    scene: str | None = None,
    nodata_prob: float = 0.1,
    nir: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate one tile: ``(image (size, size, 3) uint8 RGB, label (size, size) uint8)``.

    With ``nir`` the image is (size, size, 4): red, green, blue, near-infrared; its first three
    bands equal the RGB tile of the same seed.

    Labels are train ids 0..6 in LoveDA's order and 255 on a no-data border (drawn with
    probability ``nodata_prob``). ``scene`` is ``"rural"`` (fields, forest, water, farmsteads),
    ``"urban"`` (street grid lined with buildings) or None (drawn from the seed). The same seed
    gives the same tile.
    """
    if size < MIN_SIZE:
        raise ValueError(f"synthetic tile size must be at least {MIN_SIZE}, got {size}")
    rng = _as_rng(rng_or_seed)
    if scene is None:
        scene = SCENES[int(rng.integers(len(SCENES)))]
    if scene not in SCENES:
        raise ValueError(f"unknown scene {scene!r}; expected one of {SCENES}")
    cv = _Canvas(size, size)
    _paint_land_cover(rng, cv, scene)
    _paint_forest(rng, cv, scene)
    _paint_water(rng, cv, scene)
    roads, grid_angle = _paint_roads(rng, cv, scene)
    image = _render_ground(rng, cv)
    _paint_buildings(rng, cv, image, roads, grid_angle, scene)
    rel = _relative_luminance(cv, image) if nir else None  # (H, W), before the sensor
    image = _apply_sensor(rng, image)
    if rng.random() < nodata_prob:
        _paint_nodata(rng, cv.label, image)
    if rel is None:
        return image, cv.label
    band = _nir_sensor(rng, _nir_scene(rng, cv, rel))  # drawn last: the RGB bands stay the same
    band[cv.label == IGNORE_LABEL] = 0
    return np.dstack([image, band]), cv.label


# ---------------------------------------------------------------------------------------- on disk
def tile_seed(seed: int, split: str, index: int) -> np.random.SeedSequence:
    """The seed of tile ``index`` of ``split``: independent of the number of tiles."""
    return np.random.SeedSequence([int(seed), SPLITS.index(split), int(index)])


def tile_scene(index: int) -> str:
    """Scenes alternate so every split mixes rural and urban tiles evenly."""
    return SCENES[index % len(SCENES)]


def tile_stem(split: str, index: int) -> str:
    return f"{split}_{index:04d}"


def _resolve(name: str, value) -> int:
    if value is not None:
        return int(value)
    env = ENV_VARS[name]
    raw = os.environ.get(env)
    if raw is None or raw.strip() == "":
        return DEFAULTS[name]
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {env}={raw!r} is not an integer") from None


def _write_png_atomic(path: Path, array: np.ndarray) -> int:
    """Write ``array`` (RGB or single-channel) as PNG via a temp file; return the byte size."""
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise OSError(f"could not encode PNG for {path}")
    with atomic_output(path) as tmp:
        tmp.write_bytes(buf.tobytes())
    return len(buf)


def _write_tif_atomic(path: Path, array: np.ndarray) -> int:
    """Write ``array`` (H, W, C) as a C-band TIFF (no georeference); return the byte size."""
    import rasterio

    from ..utils.atomic import atomic_output

    h, w, c = array.shape
    with atomic_output(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        profile = dict(driver="GTiff", height=h, width=w, count=c, dtype=array.dtype.name)
        with rasterio.open(tmp, "w", **profile, compress="deflate") as dst:
            dst.write(array.transpose(2, 0, 1))
    return path.stat().st_size


def _read_tif(path: Path) -> np.ndarray | None:
    """A TIFF as (H, W, C), or None when it cannot be read."""
    import rasterio

    try:
        with rasterio.open(path) as src:
            return src.read().transpose(1, 2, 0)
    except rasterio.errors.RasterioError:
        return None


def _tile_ok(image_path: Path, label_path: Path, size: int, bands: int = 3) -> bool:
    """Both files exist and decode to the expected shapes."""
    if not (image_path.is_file() and label_path.is_file()):
        return False
    if image_path.suffix == ".tif":
        img = _read_tif(image_path)
    else:
        img = cv2.imread(str(image_path), cv2.IMREAD_UNCHANGED)
    lbl = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
    return (
        img is not None
        and lbl is not None
        and img.shape == (size, size, bands)
        and lbl.shape == (size, size)
        and lbl.dtype == np.uint8
    )


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json_atomic(path: Path, obj: dict) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))


def _complete(out: Path, params: dict) -> bool:
    """The marker matches ``params`` and every file it lists has its recorded size."""
    meta = _read_json(out / MARKER_NAME)
    if not meta or meta.get("params") != params:
        return False
    files = meta.get("files", {})
    expected = params["num_train"] + params["num_val"]
    if len(files) != 2 * expected:
        return False
    for rel, nbytes in files.items():
        try:
            if (out / rel).stat().st_size != nbytes:
                return False
        except OSError:
            return False
    return True


@contextmanager
def _locked(path: Path):
    with open(path, "a+") as fh:
        if fcntl is not None:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _generate(out: Path, params: dict) -> None:
    """Write every missing or damaged tile, drop stale ones, then write the marker."""
    start = time.perf_counter()
    # Finished tiles are reused when they were made with these parameters: by an interrupted
    # run (progress file) or for a marker whose files were damaged since.
    made_with = [_read_json(out / name) or {} for name in (PROGRESS_NAME, MARKER_NAME)]
    resume = any(m.get("params") == params for m in made_with)
    (out / MARKER_NAME).unlink(missing_ok=True)
    _write_json_atomic(out / PROGRESS_NAME, {"params": params})
    counts = {"train": params["num_train"], "val": params["num_val"]}
    bands = params.get("bands", 3)
    ext = ".tif" if bands == 4 else ".png"  # 4 bands: red, green, blue, nir
    files: dict[str, int] = {}
    made = 0
    for split in SPLITS:
        img_dir, lbl_dir = out / split / "images", out / split / "labels"
        img_dir.mkdir(parents=True, exist_ok=True)
        lbl_dir.mkdir(parents=True, exist_ok=True)
        stems = [tile_stem(split, i) for i in range(counts[split])]
        for folder, suffix in ((img_dir, ext), (lbl_dir, ".png")):
            wanted = {stem + suffix for stem in stems}  # drop stale tiles, temp files
            for p in folder.iterdir():
                if p.name not in wanted:
                    p.unlink()
        for i, stem in enumerate(stems):
            img_path, lbl_path = img_dir / (stem + ext), lbl_dir / (stem + ".png")
            if not (resume and _tile_ok(img_path, lbl_path, params["size"], bands)):
                image, label = generate_tile(
                    tile_seed(params["seed"], split, i),
                    params["size"],
                    tile_scene(i),
                    nir=bands == 4,
                )
                (_write_tif_atomic if bands == 4 else _write_png_atomic)(img_path, image)
                _write_png_atomic(lbl_path, label)
                made += 1
            for p in (img_path, lbl_path):
                files[str(p.relative_to(out))] = p.stat().st_size
    meta = {"params": params, "files": files, "classes": list(FACTS.classes)}
    _write_json_atomic(out / MARKER_NAME, meta)
    (out / PROGRESS_NAME).unlink(missing_ok=True)
    logger.info(
        "synthetic aerial set in %s: generated %d tiles (%d reused) in %.1f s",
        out,
        made,
        len(files) // 2 - made,
        time.perf_counter() - start,
    )


def ensure_synthetic_aerial(
    root: Path | str,
    num_train: int | None = None,
    num_val: int | None = None,
    size: int | None = None,
    seed: int | None = None,
    force: bool = False,
    nir: bool = False,
) -> Path:
    """Make sure ``<root>/synthetic_aerial`` holds the set for these parameters; return its path.

    ``nir``: the 4-band set (red, green, blue, near-infrared) in ``<root>/synthetic_aerial_nir``.

    Arguments left as None take the environment variables listed in the module docstring, else
    64 train / 16 val tiles of 512 x 512 px from seed 0. The set is (re)generated when it is
    absent, incomplete (no marker, a missing or changed file) or was made with other parameters;
    an interrupted generation resumes, reusing the finished tiles. ``force`` regenerates all.
    Concurrent callers are serialised by a file lock, and files are replaced atomically.
    """
    params = {
        "num_train": _resolve("num_train", num_train),
        "num_val": _resolve("num_val", num_val),
        "size": _resolve("size", size),
        "seed": _resolve("seed", seed),
        "version": GENERATOR_VERSION,
        **({"bands": len(NIR_BANDS)} if nir else {}),  # the RGB set's marker stays as it was
    }
    if params["num_train"] < 1 or params["num_val"] < 1:
        raise ValueError(
            f"synthetic aerial set needs at least one train and one val tile, got "
            f"{params['num_train']} train / {params['num_val']} val"
        )
    if params["size"] < MIN_SIZE:
        raise ValueError(f"synthetic tile size must be at least {MIN_SIZE}, got {params['size']}")
    out = Path(root).expanduser() / (DATASET_DIR_NIR if nir else DATASET_DIR)
    if not force and _complete(out, params):
        return out
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out / LOCK_NAME):
        if force:
            (out / MARKER_NAME).unlink(missing_ok=True)
            (out / PROGRESS_NAME).unlink(missing_ok=True)
        elif _complete(out, params):  # another process finished it while we waited
            return out
        logger.info("generating the synthetic aerial set in %s (%s)", out, params)
        _generate(out, params)
    return out


def class_histogram(dataset_dir: Path | str, split: str) -> np.ndarray:
    """Pixel counts (K + 1,) of each class in a generated split; the last entry is no-data."""
    k = FACTS.num_classes
    counts = np.zeros(256, np.int64)
    for p in sorted((Path(dataset_dir) / split / "labels").glob("*.png")):
        lbl = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        if lbl is None:
            raise OSError(f"{p}: not a readable PNG label")
        counts += np.bincount(lbl.ravel(), minlength=256)
    return np.concatenate([counts[:k], counts[IGNORE_LABEL : IGNORE_LABEL + 1]])
