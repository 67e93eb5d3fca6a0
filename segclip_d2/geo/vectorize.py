"""Class polygons from a class-id raster, read in strips so memory stays flat in the raster size.

Every strip is split into 4-connected same-class components (``scipy.ndimage.label``), each
polygonised by ``rasterio.features.shapes`` (one polygon, holes included, per component). A
component touching the strip's top or bottom row may continue in the next strip: components that
meet across a strip seam with the same class are joined (union-find) and their pieces merged with
shapely, so no polygon is cut at a seam. Components that touch no seam are final at once.

Each feature carries ``class_id``, ``class_name``, ``area_m2`` (pixel count x pixel area in a
projected CRS in metres, null otherwise), ``mean_confidence`` (mean top-1 probability of its
pixels, null without a confidence source) and is written in the raster's CRS by pyogrio.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..data.dataset_facts import IGNORE_LABEL
from ..utils.atomic import atomic_output
from .gsd import metres_per_unit

logger = logging.getLogger(__name__)

DRIVERS = {"gpkg": ("GPKG", ".gpkg"), "geojson": ("GeoJSON", ".geojson")}
# Pixels per strip (rows = this / width): the strip arrays are the vectoriser's working memory.
STRIP_PIXELS = 1 << 22

# read(y, h) -> (h, width) array of the strip starting at row y
RowReader = Callable[[int, int], np.ndarray]


def pixel_area_m2(crs, transform) -> float | None:
    """Area of one pixel in m², or ``None`` when the CRS is missing or not projected in metres."""
    factor = metres_per_unit(crs, transform)
    if factor is None:
        return None
    return abs(transform.a * transform.e - transform.b * transform.d) * factor * factor


class _UnionFind:
    def __init__(self):
        self.parent: dict[int, int] = {}

    def find(self, a: int) -> int:
        p = self.parent.setdefault(a, a)
        while p != self.parent.setdefault(p, p):
            self.parent[a] = self.parent[p]
            a, p = p, self.parent[p]
        return p

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _label_classes(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """4-connected components of equal class -> (labels (h, w) int32, 0 = no data; class of each
    label (n + 1,), index 0 unused)."""
    from scipy import ndimage

    labels = np.zeros(ids.shape, np.int32)
    classes = [0]
    n = 0
    for c in np.unique(ids):
        if c == IGNORE_LABEL:
            continue
        lab, k = ndimage.label(ids == c)  # default structure: 4-connectivity
        labels[lab > 0] = lab[lab > 0] + n
        classes += [int(c)] * k
        n += k
    return labels, np.asarray(classes, np.int64)


def polygonize(
    height: int,
    width: int,
    transform,
    read_ids: RowReader,
    read_conf: RowReader | None = None,
    strip_rows: int | None = None,
):
    """Yield ``(shapely polygon, class_id, pixel_count, confidence_sum or None)`` per 4-connected
    class region of the raster; regions spanning strips come out as one polygon."""
    import shapely
    from affine import Affine
    from rasterio.features import shapes
    from shapely.geometry import shape

    transform = transform if transform is not None else Affine.identity()
    rows = strip_rows or max(1, STRIP_PIXELS // max(1, width))
    uf = _UnionFind()
    # Pieces that touch a seam: gid -> (class, [geoms], count, conf_sum)
    open_pieces: dict[int, tuple[int, list, int, float]] = {}
    prev_last: np.ndarray | None = None  # global ids of the previous strip's last row
    prev_ids: np.ndarray | None = None
    offset = 0
    for y in range(0, height, rows):
        h = min(rows, height - y)
        ids = np.asarray(read_ids(y, h), dtype=np.uint8)
        labels, classes = _label_classes(ids)
        n = len(classes) - 1
        counts = np.bincount(labels.ravel(), minlength=n + 1)
        conf_sums = None
        if read_conf is not None:
            conf = np.asarray(read_conf(y, h), dtype=np.float64)
            conf_sums = np.bincount(labels.ravel(), weights=conf.ravel(), minlength=n + 1)
        seam = np.zeros(n + 1, bool)
        if y > 0:
            seam[labels[0]] = True
        if y + h < height:
            seam[labels[-1]] = True
        seam[0] = False
        if prev_last is not None:
            # Same class above and below the seam -> one region.
            join = (prev_ids == ids[0]) & (prev_last > 0) & (labels[0] > 0)
            for a, b in set(zip(prev_last[join].tolist(), (labels[0][join] + offset).tolist())):
                uf.union(a, b)
        strip_tf = transform @ Affine.translation(0, y)
        for geom, value in shapes(labels, mask=labels > 0, connectivity=4, transform=strip_tf):
            lab = int(value)
            poly = shape(geom)
            cs = None if conf_sums is None else float(conf_sums[lab])
            if seam[lab]:
                gid = lab + offset
                cls, geoms, cnt, csum = open_pieces.get(gid, (int(classes[lab]), [], 0, 0.0))
                geoms.append(poly)
                open_pieces[gid] = (cls, geoms, cnt + int(counts[lab]), csum + (cs or 0.0))
            else:
                yield poly, int(classes[lab]), int(counts[lab]), cs
        prev_last = np.where(labels[-1] > 0, labels[-1] + offset, 0)
        prev_ids = ids[-1].copy()
        offset += n
    groups: dict[int, list[int]] = {}
    for gid in open_pieces:
        groups.setdefault(uf.find(gid), []).append(gid)
    for members in groups.values():
        cls = open_pieces[members[0]][0]
        geoms = [g for m in members for g in open_pieces[m][1]]
        count = sum(open_pieces[m][2] for m in members)
        csum = sum(open_pieces[m][3] for m in members) if read_conf is not None else None
        merged = geoms[0] if len(geoms) == 1 else shapely.union_all(geoms)
        if merged.geom_type == "MultiPolygon":  # pieces joined through an edge cannot split
            merged = max(merged.geoms, key=lambda g: g.area)
        yield merged, cls, count, csum


def write_polygons(
    path: str | Path,
    kind: str,
    height: int,
    width: int,
    crs,
    transform,
    class_names: Sequence[str],
    read_ids: RowReader,
    read_conf: RowReader | None = None,
    min_area: float = 0.0,
    simplify: float = 0.0,
    strip_rows: int | None = None,
) -> int:
    """Polygonise the class raster into ``path`` (``kind`` gpkg or geojson) atomically; returns
    the number of features. ``min_area`` (m², or pixels without a metric CRS) drops smaller
    polygons; ``simplify`` (CRS units) simplifies them, keeping them valid."""
    import pyogrio.raw
    import shapely

    if kind not in DRIVERS:
        raise ValueError(f"--vector must be one of {sorted(DRIVERS)}, got {kind!r}")
    driver, ext = DRIVERS[kind]
    px_area = pixel_area_m2(crs, transform)
    if px_area is None:
        logger.warning(
            "%s: the raster has no projected CRS in metres; area_m2 is left empty and "
            "--min-area counts pixels",
            path,
        )
    if crs is None and kind == "geojson":
        logger.warning(
            "%s: the input has no CRS; polygons are in pixel coordinates (GeoJSON readers assume "
            "WGS 84 for a file without CRS; --vector gpkg keeps it undefined)",
            path,
        )
    geoms, cls_ids, areas, confs = [], [], [], []
    for poly, cls, count, csum in polygonize(
        height, width, transform, read_ids, read_conf, strip_rows
    ):
        area = count * px_area if px_area is not None else None
        if min_area > 0 and (area if area is not None else count) < min_area:
            continue
        if simplify > 0:
            poly = shapely.simplify(poly, simplify, preserve_topology=True)
        geoms.append(poly)
        cls_ids.append(cls)
        areas.append(np.nan if area is None else area)
        confs.append(np.nan if csum is None else csum / count)
    names = list(class_names)
    fields = ["class_id", "class_name", "area_m2", "mean_confidence"]
    data = [
        np.asarray(cls_ids, np.int32),
        np.asarray([names[c] if c < len(names) else str(c) for c in cls_ids], dtype=object),
        np.asarray(areas, np.float64),
        np.asarray(confs, np.float64),
    ]
    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.unlink()  # pyogrio creates the file itself
        pyogrio.raw.write(
            str(tmp),
            shapely.to_wkb(np.asarray(geoms, dtype=object)) if geoms else np.asarray([], object),
            data,
            fields,
            layer=path.stem,
            driver=driver,
            geometry_type="Polygon",
            crs=crs.to_wkt() if crs is not None else None,
        )
    return len(geoms)
