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
from ..utils.atomic import AtomicFile
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


class Polygonizer:
    """Class regions of a raster fed strip by strip, top to bottom (any strip heights):
    :meth:`feed` returns the regions that touch no seam at once, :meth:`finish` the ones joined
    across seams. Each region is ``(shapely polygon, class_id, pixel_count, confidence_sum or
    None)``."""

    def __init__(self, height: int, width: int, transform, with_conf: bool):
        from affine import Affine

        self.height, self.width, self.with_conf = height, width, with_conf
        self.transform = transform if transform is not None else Affine.identity()
        self.uf = _UnionFind()
        # Pieces that touch a seam: gid -> (class, [geoms], count, conf_sum)
        self.open_pieces: dict[int, tuple[int, list, int, float]] = {}
        self.prev_last: np.ndarray | None = None  # global ids of the previous strip's last row
        self.prev_ids: np.ndarray | None = None
        self.offset = 0
        self.y = 0  # first row of the next strip

    def feed(self, ids: np.ndarray, conf: np.ndarray | None = None) -> list[tuple]:
        """Regions of the strip ``ids`` (h, width) that are final; ``conf`` (h, width) is the
        top-1 probability of its pixels."""
        from affine import Affine
        from rasterio.features import shapes
        from shapely.geometry import shape

        y, h = self.y, ids.shape[0]
        ids = np.asarray(ids, dtype=np.uint8)
        labels, classes = _label_classes(ids)
        n = len(classes) - 1
        counts = np.bincount(labels.ravel(), minlength=n + 1)
        conf_sums = None
        if self.with_conf and conf is not None:
            conf = np.asarray(conf, dtype=np.float64).ravel()
            conf_sums = np.bincount(labels.ravel(), weights=conf, minlength=n + 1)
        seam = np.zeros(n + 1, bool)
        seam[labels[0]] = y > 0
        seam[labels[-1]] |= y + h < self.height
        seam[0] = False
        if self.prev_last is not None:
            # Same class above and below the seam -> one region.
            join = (self.prev_ids == ids[0]) & (self.prev_last > 0) & (labels[0] > 0)
            pairs = zip(self.prev_last[join].tolist(), (labels[0][join] + self.offset).tolist())
            for a, b in set(pairs):
                self.uf.union(a, b)
        done = []
        strip_tf = self.transform @ Affine.translation(0, y)
        for geom, value in shapes(labels, mask=labels > 0, connectivity=4, transform=strip_tf):
            lab = int(value)
            cs = None if conf_sums is None else float(conf_sums[lab])
            if seam[lab]:
                gid = lab + self.offset
                cls, geoms, cnt, csum = self.open_pieces.get(gid, (int(classes[lab]), [], 0, 0.0))
                geoms.append(shape(geom))
                self.open_pieces[gid] = (cls, geoms, cnt + int(counts[lab]), csum + (cs or 0.0))
            else:
                done.append((shape(geom), int(classes[lab]), int(counts[lab]), cs))
        self.prev_last = np.where(labels[-1] > 0, labels[-1] + self.offset, 0)
        self.prev_ids = ids[-1].copy()
        self.offset += n
        self.y += h
        return done

    def finish(self) -> list[tuple]:
        """The regions that spanned seams, each merged into one polygon."""
        import shapely

        if self.y != self.height:
            raise RuntimeError(f"polygons: {self.y} of {self.height} rows fed (internal error)")
        groups: dict[int, list[int]] = {}
        for gid in self.open_pieces:
            groups.setdefault(self.uf.find(gid), []).append(gid)
        out = []
        for members in groups.values():
            pieces = [self.open_pieces[m] for m in members]
            geoms = [g for p in pieces for g in p[1]]
            count = sum(p[2] for p in pieces)
            csum = sum(p[3] for p in pieces) if self.with_conf else None
            merged = geoms[0] if len(geoms) == 1 else shapely.union_all(geoms)
            if merged.geom_type == "MultiPolygon":  # pieces joined through an edge cannot split
                merged = max(merged.geoms, key=lambda g: g.area)
            out.append((merged, pieces[0][0], count, csum))
        return out


def polygonize(
    height: int,
    width: int,
    transform,
    read_ids: RowReader,
    read_conf: RowReader | None = None,
    strip_rows: int | None = None,
):
    """Yield ``(shapely polygon, class_id, pixel_count, confidence_sum or None)`` per 4-connected
    class region of the raster read in strips; regions spanning strips come out as one polygon."""
    rows = strip_rows or max(1, STRIP_PIXELS // max(1, width))
    poly = Polygonizer(height, width, transform, read_conf is not None)
    for y in range(0, height, rows):
        h = min(rows, height - y)
        yield from poly.feed(read_ids(y, h), None if read_conf is None else read_conf(y, h))
    yield from poly.finish()


class PolygonWriter:
    """Polygons written to ``path`` (``kind`` gpkg or geojson) atomically on :meth:`close`, from
    regions given by :meth:`add` (see :class:`Polygonizer`). ``min_area`` (m², or pixels without
    a metric CRS) drops smaller polygons; ``simplify`` (CRS units) simplifies them, keeping them
    valid."""

    def __init__(self, path, kind, crs, transform, class_names, min_area=0.0, simplify=0.0):
        if kind not in DRIVERS:
            raise ValueError(f"--vector must be one of {sorted(DRIVERS)}, got {kind!r}")
        self.path, self.kind, self.crs = Path(path), kind, crs
        self.names, self.min_area, self.simplify = list(class_names), min_area, simplify
        self.px_area = pixel_area_m2(crs, transform)
        if self.px_area is None:
            logger.warning(
                "%s: the raster has no projected CRS in metres; area_m2 is left empty and "
                "--min-area counts pixels",
                path,
            )
        if crs is None and kind == "geojson":
            logger.warning(
                "%s: the input has no CRS; polygons are in pixel coordinates (GeoJSON readers "
                "assume WGS 84 for a file without CRS; --vector gpkg keeps it undefined)",
                path,
            )
        self.geoms, self.cls_ids, self.areas, self.confs = [], [], [], []

    def add(self, regions) -> None:
        import shapely

        for poly, cls, count, csum in regions:
            area = count * self.px_area if self.px_area is not None else None
            if self.min_area > 0 and (area if area is not None else count) < self.min_area:
                continue
            if self.simplify > 0:
                poly = shapely.simplify(poly, self.simplify, preserve_topology=True)
            self.geoms.append(poly)
            self.cls_ids.append(cls)
            self.areas.append(np.nan if area is None else area)
            self.confs.append(np.nan if csum is None else csum / count)

    def close(self) -> int:
        """Write the file (temp name + rename); returns the number of features."""
        self.finish().commit()
        return len(self.geoms)

    def finish(self) -> AtomicFile:
        """Write the file under a temp name; ``.commit()`` the returned :class:`AtomicFile` to
        rename it into place."""
        import pyogrio.raw
        import shapely

        names, cls_ids = self.names, self.cls_ids
        fields = ["class_id", "class_name", "area_m2", "mean_confidence"]
        data = [
            np.asarray(cls_ids, np.int32),
            np.asarray([names[c] if c < len(names) else str(c) for c in cls_ids], dtype=object),
            np.asarray(self.areas, np.float64),
            np.asarray(self.confs, np.float64),
        ]
        geoms = np.asarray(self.geoms, dtype=object)
        out = AtomicFile(self.path)
        try:
            out.tmp.unlink()  # pyogrio creates the file itself
            pyogrio.raw.write(
                str(out.tmp),
                shapely.to_wkb(geoms) if len(geoms) else np.asarray([], object),
                data,
                fields,
                layer=self.path.stem,
                driver=DRIVERS[self.kind][0],
                geometry_type="Polygon",
                crs=self.crs.to_wkt() if self.crs is not None else None,
            )
        except BaseException:
            out.abort()
            raise
        return out


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
    """Polygonise a class raster read in strips into ``path`` (see :class:`PolygonWriter`);
    returns the number of features."""
    writer = PolygonWriter(path, kind, crs, transform, class_names, min_area, simplify)
    writer.add(polygonize(height, width, transform, read_ids, read_conf, strip_rows))
    return writer.close()
