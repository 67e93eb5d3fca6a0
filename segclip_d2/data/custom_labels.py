"""Scenes and labels of your own data, on each scene's grid (used by
``datasets/prepare_custom.py``, see :mod:`segclip_d2.data.custom`).

* Scenes: any GDAL raster, any number of bands, all in one CRS and at one pixel size.
* Raster labels: matched to scenes by file stem, or one mosaic covering them; reprojected and
  resampled (nearest) onto each scene's grid with ``rasterio.warp.reproject``.
* Vector labels: one file (GeoPackage, GeoJSON, Shapefile, ... read with pyogrio); its polygons
  are reprojected to the scenes' CRS and rasterised (``rasterio.features.rasterize``) onto each
  scene's grid, the class taken from the attribute ``field`` of ``classes.yaml``.

Pixels no label covers are ignore (255), never class 0. Every bad input is a :class:`UserError`.
"""

from __future__ import annotations

import glob
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from .custom import ClassesFile
from .dataset_facts import IGNORE_LABEL

RASTER_SUFFIXES = (".tif", ".tiff", ".img", ".jp2", ".vrt", ".png", ".jpg", ".jpeg")
VECTOR_SUFFIXES = (".gpkg", ".geojson", ".json", ".shp", ".fgb", ".kml", ".gml")
GSD_TOLERANCE = 1e-6  # relative pixel-size difference still counted as the same GSD


@dataclass(frozen=True)
class Scene:
    """One scene's grid: path, stem, CRS, affine transform, size, band count, data type."""

    path: Path
    stem: str
    crs: object
    transform: object
    width: int
    height: int
    count: int
    dtype: str

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        from rasterio.transform import array_bounds

        return array_bounds(self.height, self.width, self.transform)  # (west, south, east, north)


def expand_paths(specs: list[str], suffixes: tuple[str, ...], what: str) -> list[Path]:
    """Files named by ``specs``: files, folders (their files with ``suffixes``) or globs."""
    found: list[Path] = []
    for spec in specs:
        p = Path(spec).expanduser()
        if p.is_dir():
            found += sorted(f for f in p.iterdir() if f.suffix.lower() in suffixes)
        elif p.is_file():
            found.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(str(p)))
            if not matches:
                raise UserError(f"{what} {spec}", "no such file, folder or matching files")
            found += [m for m in matches if m.is_file()]
    if not found:
        raise UserError(f"{what} {' '.join(specs)}", "holds no files", f"name {what} files")
    return list(dict.fromkeys(found))


def open_scene(path: Path, bands: tuple[str, ...]) -> Scene:
    import rasterio

    try:
        with rasterio.open(path) as src:
            scene = Scene(
                path,
                path.stem,
                src.crs,
                src.transform,
                src.width,
                src.height,
                src.count,
                src.dtypes[0],
            )
    except rasterio.errors.RasterioError as e:
        raise UserError(str(path), f"cannot be read as a raster ({e})") from None
    if scene.count != len(bands):
        raise UserError(
            str(path), f"has {scene.count} bands, classes.yaml names {len(bands)} ({list(bands)})"
        )
    if scene.crs is None:
        raise UserError(str(path), "has no CRS", "georeference the scene (e.g. in QGIS)")
    return scene


def check_same_grid(scenes: list[Scene]) -> None:
    """All scenes in one CRS and at one pixel size, and no two with the same stem."""
    first = scenes[0]
    res0 = (abs(first.transform.a), abs(first.transform.e))
    for s in scenes[1:]:
        if s.crs != first.crs:
            raise UserError(
                str(s.path),
                f"is in {s.crs}, {first.path.name} in {first.crs}",
                "reproject the scenes to one CRS (gdalwarp -t_srs)",
            )
        res = (abs(s.transform.a), abs(s.transform.e))
        if any(abs(a - b) > GSD_TOLERANCE * b for a, b in zip(res, res0)):
            raise UserError(
                str(s.path),
                f"has pixel size {res}, {first.path.name} {res0}",
                "resample the scenes to one GSD (gdalwarp -tr)",
            )
    stems = Counter(s.stem for s in scenes)
    dup = [k for k, n in stems.items() if n > 1]
    if dup:
        raise UserError(f"scene {dup[0]}", "two scenes share this file stem", "rename one")


# --------------------------------------------------------------------------- value -> train id
def _norm_value(v):
    """Attribute/raster values compared with classes.yaml's: integral numbers as int."""
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def unknown_values_error(where: str, values: Counter, classes: ClassesFile) -> UserError:
    known = [c.value for c in classes.classes]
    detail = ", ".join(f"{v!r} ({n})" for v, n in sorted(values.items(), key=str)[:8])
    return UserError(
        where,
        f"label values not in {classes.path}: {detail}",
        f"add them to classes.yaml (known: {known}) or set ignore_value",
    )


def raster_values_to_train(raw: np.ndarray, classes: ClassesFile, where: str) -> np.ndarray:
    """Raw label values (int64; -1 = no label) -> train ids uint8 (255 = ignore)."""
    out = np.full(raw.shape, IGNORE_LABEL, np.uint8)
    lut = {_norm_value(k): v for k, v in classes.value_to_train().items()}
    unknown: Counter = Counter()
    values, counts = np.unique(raw, return_counts=True)
    for value, count in zip(values.tolist(), counts.tolist()):
        if value == -1 or value == classes.ignore_value:
            continue
        if value not in lut:
            unknown[value] = count
            continue
        out[raw == value] = lut[value]
    if unknown:
        raise unknown_values_error(where, unknown, classes)
    return out


# --------------------------------------------------------------------------- raster labels
def match_label_rasters(scenes: list[Scene], labels: list[Path]) -> dict[str, Path]:
    """Scene stem -> its label raster: by stem, or the one mosaic for every scene."""
    by_stem = {p.stem: p for p in labels}
    if all(s.stem in by_stem for s in scenes):
        return {s.stem: by_stem[s.stem] for s in scenes}
    if len(labels) == 1:
        return {s.stem: labels[0] for s in scenes}
    missing = next(s for s in scenes if s.stem not in by_stem)
    raise UserError(
        f"--labels {labels[0].parent}",
        f"no label raster named {missing.stem}.* for scene {missing.path}",
        "name each label raster like its scene, or give one mosaic that covers all scenes",
    )


def _overlaps(a: tuple, b: tuple) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def raster_label_on_grid(path: Path, scene: Scene, classes: ClassesFile) -> np.ndarray:
    """The label raster ``path`` resampled (nearest) onto ``scene``'s grid -> train ids (H, W)."""
    import rasterio
    from rasterio.warp import Resampling, reproject, transform_bounds

    try:
        with rasterio.open(path) as src:
            if src.crs is None:
                raise UserError(str(path), "has no CRS", "georeference the label raster")
            bounds = transform_bounds(src.crs, scene.crs, *src.bounds)
            if not _overlaps(bounds, scene.bounds):
                raise UserError(
                    str(path),
                    f"does not overlap its scene {scene.path}",
                    "check the label raster's georeference and CRS",
                )
            raw = np.full((scene.height, scene.width), -1, np.int64)
            reproject(
                source=rasterio.band(src, 1),
                destination=raw,
                src_nodata=src.nodata,
                dst_transform=scene.transform,
                dst_crs=scene.crs,
                dst_nodata=-1,
                resampling=Resampling.nearest,
            )
    except rasterio.errors.RasterioError as e:
        raise UserError(str(path), f"cannot be read as a raster ({e})") from None
    return raster_values_to_train(raw, classes, str(path))


# --------------------------------------------------------------------------- vector labels
@dataclass(frozen=True)
class VectorLabels:
    """Polygons in the scenes' CRS with their train ids and feature ids."""

    path: Path
    geometries: list  # shapely geometries
    train_ids: list[int]
    fids: list[int]


def read_vector_labels(path: Path, classes: ClassesFile, crs) -> VectorLabels:
    """Read the polygons of ``path`` and their classes (attribute ``classes.field``), in
    ``crs``. Values not in classes.yaml (but ``ignore_value``) are a :class:`UserError`."""
    import pyogrio
    import shapely
    from rasterio.warp import transform_geom

    field = classes.field
    if not field:
        raise UserError(classes.path, "vector labels need 'field:'", "name the class attribute")
    try:
        info = pyogrio.read_info(path)
        if field not in list(info["fields"]):
            raise UserError(
                str(path),
                f"has no attribute {field!r} (has {list(info['fields'])})",
                "fix 'field:'",
            )
        meta, fids, wkb, values = pyogrio.raw.read(path, columns=[field], return_fids=True)
    except pyogrio.errors.DataSourceError as e:
        raise UserError(str(path), f"cannot be read as vector data ({e})") from None
    src_crs = meta.get("crs") or crs
    lut = {_norm_value(k): v for k, v in classes.value_to_train().items()}
    geoms, ids, kept, unknown = [], [], [], Counter()
    for fid, blob, value in zip(fids.tolist(), wkb, values[0]):
        value = _norm_value(value)
        if blob is None or value == classes.ignore_value:
            continue
        if value not in lut:
            unknown[value] += 1
            continue
        geom = shapely.from_wkb(blob)
        if str(src_crs) != str(crs):
            geom = shapely.geometry.shape(
                transform_geom(src_crs, crs, shapely.geometry.mapping(geom))
            )
        geoms.append(geom)
        ids.append(lut[value])
        kept.append(fid)
    if unknown:
        raise unknown_values_error(f"{path} attribute {field!r}", unknown, classes)
    if not geoms:
        raise UserError(str(path), "holds no labelled polygons")
    return VectorLabels(path, geoms, ids, kept)


def check_polygons_inside(labels: VectorLabels, scenes: list[Scene]) -> None:
    """Every polygon touches at least one scene."""
    import shapely

    boxes = [shapely.box(*s.bounds) for s in scenes]
    outside = [
        f for g, f in zip(labels.geometries, labels.fids) if not any(g.intersects(b) for b in boxes)
    ]
    if outside:
        raise UserError(
            str(labels.path),
            f"{len(outside)} polygon(s) lie outside every scene (feature ids {outside[:5]})",
            "check the CRS of the layer and of the scenes, or remove those polygons",
        )


def rasterize_labels(labels: VectorLabels, scene: Scene) -> np.ndarray:
    """The polygons on ``scene``'s grid -> train ids (H, W); later features win overlaps."""
    import shapely
    from rasterio.features import rasterize

    box = shapely.box(*scene.bounds)
    shapes = [(g, i) for g, i in zip(labels.geometries, labels.train_ids) if g.intersects(box)]
    if not shapes:
        return np.full((scene.height, scene.width), IGNORE_LABEL, np.uint8)
    return rasterize(
        shapes,
        out_shape=(scene.height, scene.width),
        transform=scene.transform,
        fill=IGNORE_LABEL,
        dtype="uint8",
    )
