"""Tiling, splitting and writing your own dataset (``datasets/prepare_custom.py``).

Split: never per tile (neighbouring tiles of one place are nearly the same picture, so a tile split
leaks). ``scene``: whole scenes go to train or val (the default with two scenes or more);
``block``: each scene is cut into blocks of ``block_tiles`` x ``block_tiles`` tiles and whole blocks
go to train or val (for a single scene). Which ones is drawn from ``seed``, and written down in
``dataset.yaml``.

Tiles lie on a grid without overlap, so no pixel is in both splits; edge tiles are padded to the
full tile size (bands with the scene's nodata or 0, labels with ignore: a tile of a few pixels
would shrink to nothing in the deepest feature map), and tiles without any labelled pixel are not
written. A scene smaller than the tile size is one tile of its own size.

Everything is written into a hidden staging folder (``utils.atomic`` temp name) that becomes
``<dst>/<NAME>`` only when complete, ``dataset.yaml`` last: an error or an interrupt leaves
nothing half-written, and an existing dataset is replaced only with ``overwrite``.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..utils.atomic import atomic_output, parse_temp_name, temp_name, writer_alive
from .custom import CUSTOM_SPLITS, DATASET_FILE, ClassesFile
from .custom_labels import Scene
from .dataset_facts import IGNORE_LABEL

SPLIT_METHODS = ("auto", "scene", "block")


@dataclass(frozen=True)
class TileWindow:
    """A tile of a scene: pixel offsets and size."""

    scene: str
    y: int
    x: int
    h: int
    w: int

    @property
    def stem(self) -> str:
        return f"{self.scene}_{self.y:06d}_{self.x:06d}"


def tile_grid(scene: Scene, tile: int) -> list[TileWindow]:
    """Non-overlapping tiles of ``scene``, all of one size (edge tiles reach past the scene)."""
    h, w = min(tile, scene.height), min(tile, scene.width)
    return [
        TileWindow(scene.stem, y, x, h, w)
        for y in range(0, scene.height, h)
        for x in range(0, scene.width, w)
    ]


def _draw_val(keys: list, fraction: float, seed: int, what: str) -> set:
    """``round(fraction * n)`` of ``keys`` (at least 1, at most n - 1), drawn from ``seed``."""
    if len(keys) < 2:
        raise UserError(
            "--split",
            f"only {len(keys)} {what}: nothing to split into train and val",
            "add scenes, or use --split block with a smaller --block-tiles",
        )
    n_val = min(len(keys) - 1, max(1, round(fraction * len(keys))))
    order = np.random.default_rng(seed).permutation(len(keys))
    return {keys[i] for i in order[:n_val]}


def assign_splits(
    scenes: list[Scene], tile: int, method: str, fraction: float, block_tiles: int, seed: int
) -> tuple[dict[str, list[TileWindow]], dict]:
    """Tiles of every scene with their split: ({"train": [...], "val": [...]}, description)."""
    if method not in SPLIT_METHODS:
        raise UserError("--split", f"unknown method {method!r}", f"use one of {SPLIT_METHODS}")
    if method == "auto":
        method = "scene" if len(scenes) >= 2 else "block"
    tiles = [t for s in scenes for t in tile_grid(s, tile)]
    span = tile * block_tiles
    if method == "scene":
        val_keys = _draw_val(sorted(s.stem for s in scenes), fraction, seed, "scene(s)")
        in_val = [t.scene in val_keys for t in tiles]
        info = {"val_scenes": sorted(val_keys)}
    else:
        blocks = sorted({(t.scene, t.y // span, t.x // span) for t in tiles})
        val_keys = _draw_val(blocks, fraction, seed, "block(s)")
        in_val = [(t.scene, t.y // span, t.x // span) in val_keys for t in tiles]
        info = {"block_size_px": span, "val_blocks": [list(b) for b in sorted(val_keys)]}
    out = {"train": [], "val": []}
    for t, v in zip(tiles, in_val):
        out["val" if v else "train"].append(t)
    info = {"method": method, "val_fraction": fraction, "seed": seed, **info}
    return out, info


@dataclass
class BandStats:
    """Running per-band sums over valid pixels (float64)."""

    count: int = 0
    total: np.ndarray | None = None
    squares: np.ndarray | None = None

    def add(self, data: np.ndarray, valid: np.ndarray) -> None:
        """``data`` (C, h, w), ``valid`` (h, w) bool."""
        values = data[:, valid].astype(np.float64)  # (C, n)
        if self.total is None:
            self.total = np.zeros(data.shape[0])
            self.squares = np.zeros(data.shape[0])
        self.total += values.sum(axis=1)
        self.squares += (values**2).sum(axis=1)
        self.count += values.shape[1]

    def mean_std(self) -> tuple[list[float], list[float]]:
        mean = self.total / self.count
        std = np.sqrt(np.maximum(self.squares / self.count - mean**2, 0.0))
        std = np.where(std > 0, std, 1.0)  # a constant band: any scale works
        return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]


def remove_stale_staging(dst: Path, name: str) -> None:
    """Staging folders of ``name`` left by interrupted runs whose process is gone."""
    for p in dst.glob(f".{name}.tmp-*"):
        parsed = parse_temp_name(p.name)
        if p.is_dir() and parsed and parsed[0] == name:
            with contextlib.suppress(OSError):
                if not writer_alive(parsed[1], parsed[2], p.stat().st_mtime):
                    shutil.rmtree(p)


@dataclass
class DatasetWriter:
    """Writes tiles into a staging folder that becomes ``dst / name`` in :meth:`commit`."""

    dst: Path
    name: str
    overwrite: bool = False
    stats: BandStats = field(default_factory=BandStats)
    counts: dict = field(default_factory=lambda: {s: 0 for s in CUSTOM_SPLITS})

    def __post_init__(self):
        self.final = self.dst / self.name
        if self.final.exists() and not self.overwrite:
            raise UserError(
                str(self.final), "exists", "pass --overwrite to replace it, or another --name"
            )
        self.dst.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(self.dst, self.name)
        self.staging = temp_name(self.final)
        for split in CUSTOM_SPLITS:
            for sub in ("images", "labels"):
                (self.staging / split / sub).mkdir(parents=True)

    def write_tile(self, src, tile: TileWindow, label, valid, split: str, bands) -> None:
        """Write the tile's bands (GeoTIFF, georeference kept) and label (train-id PNG);
        ``valid`` (h, w) bool marks the pixels the band statistics count (the scene's data)."""
        import rasterio
        from rasterio.windows import Window

        from ..raster.writers import write_png

        win = Window(tile.x, tile.y, tile.w, tile.h)
        data = src.read(window=win, boundless=True, fill_value=src.nodata or 0)  # (C, h, w)
        profile = dict(
            driver="GTiff",
            width=tile.w,
            height=tile.h,
            count=src.count,
            dtype=src.dtypes[0],
            crs=src.crs,
            transform=src.window_transform(win),
            nodata=src.nodata,
            compress="deflate",
        )
        folder = self.staging / split
        with atomic_output(folder / "images" / f"{tile.stem}.tif") as tmp:
            with rasterio.open(tmp, "w", **profile) as out:
                out.write(data)
                for i, name in enumerate(bands, start=1):
                    out.set_band_description(i, name)
        write_png(folder / "labels" / f"{tile.stem}.png", label)
        if split == "train":
            self.stats.add(data, valid)
        self.counts[split] += 1

    def commit(self, dataset: dict) -> Path:
        """Write ``dataset.yaml`` last, then move the staging folder to ``dst / name``."""
        import yaml

        with atomic_output(self.staging / DATASET_FILE) as tmp:
            tmp.write_text(yaml.safe_dump(dataset, sort_keys=False, allow_unicode=True))
        old = None
        if self.final.exists():
            old = temp_name(self.final)
            os.replace(self.final, old)
        os.replace(self.staging, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def _padded(array: np.ndarray, t: TileWindow, fill) -> np.ndarray:
    """``array``'s (h, w) window of tile ``t``, padded with ``fill`` past the scene's edge."""
    part = array[t.y : t.y + t.h, t.x : t.x + t.w]
    pad = ((0, t.h - part.shape[0]), (0, t.w - part.shape[1]))
    return np.pad(part, pad, constant_values=fill) if any(p[1] for p in pad) else part


def write_scene_tiles(scene: Scene, label: np.ndarray, tiles, writer: DatasetWriter, bands):
    """Write the labelled tiles of one scene; ``tiles`` maps split -> its tiles of any scene.
    Pixels outside the scene's valid-data mask are ignore."""
    import rasterio

    with rasterio.open(scene.path) as src:
        valid = src.dataset_mask() > 0  # (H, W)
        label = np.where(valid, label, IGNORE_LABEL).astype(np.uint8)
        for split in CUSTOM_SPLITS:
            for t in tiles[split]:
                if t.scene != scene.stem:
                    continue
                part, inside = _padded(label, t, IGNORE_LABEL), _padded(valid, t, False)
                if (part != IGNORE_LABEL).any():
                    writer.write_tile(src, t, part, inside, split, bands)


def dataset_record(
    name: str, classes: ClassesFile, writer: DatasetWriter, split: dict, gsd_m, scenes, tile: int
) -> dict:
    """The content of ``dataset.yaml``."""
    empty = [s for s, n in writer.counts.items() if n == 0]
    if empty:
        raise UserError(
            "--split",
            f"the {empty[0]} split holds no labelled tile ({writer.counts})",
            "change --val-fraction, --seed or --block-tiles, or label more of the scenes",
        )
    mean, std = writer.stats.mean_std()
    return {
        "name": name,
        "classes": [
            {"name": c.name, "color": list(c.color), "prompts": list(c.prompts), "value": c.value}
            for c in classes.classes
        ],
        "ignore_label": IGNORE_LABEL,
        "bands": list(classes.bands),
        "pixel_mean": mean,
        "pixel_std": std,
        "gsd_m": float(gsd_m) if gsd_m and math.isfinite(gsd_m) else None,
        "crs": scenes[0].crs.to_string(),
        "tile_size": tile,
        "tiles": dict(writer.counts),
        "split": split,
        "scenes": [str(s.path) for s in scenes],
    }
