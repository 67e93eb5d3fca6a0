"""Writing predictions: PNG images and (Geo)TIFF / Cloud-Optimized GeoTIFF rasters written window
by window. Every file goes through :mod:`segclip_d2.utils.atomic` (hidden temp name, renamed
into place only when complete)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..utils.atomic import AtomicFile, temp_name


@dataclass(frozen=True)
class Georef:
    """Where a raster lies: CRS + transform, or ground control points ``(gcps, crs)`` for a
    raster referenced only by those, and RPCs when GDAL has them. Outputs carry the input's."""

    crs: object = None
    transform: object = None
    gcps: tuple | None = None
    rpcs: object = None

    @classmethod
    def of(cls, source) -> Georef:
        gcps = getattr(source, "gcps", None)
        return cls(
            crs=source.crs,
            transform=source.transform,
            gcps=(gcps, source.gcps_crs) if gcps else None,
            rpcs=getattr(source, "rpcs", None),
        )


def write_png(path: str | Path, array: np.ndarray) -> None:
    """Write an (H, W) or (H, W, 3) RGB uint8 array as PNG via a temp file + rename."""
    staged_png(path, array).commit()


def staged_png(path: str | Path, array: np.ndarray) -> AtomicFile:
    """Write the PNG of ``array`` under a temp name next to ``path``; ``.commit()`` the returned
    :class:`AtomicFile` to rename it into place."""
    out = AtomicFile(path)
    try:
        arr = array if array.ndim == 2 else array[:, :, ::-1]  # RGB -> BGR for OpenCV
        if not cv2.imwrite(str(out.tmp), np.ascontiguousarray(arr)):
            raise OSError(f"{path}: could not be written")
    except BaseException:
        out.abort()
        raise
    return out


class RasterWriter:
    """A multi-band (Geo)TIFF written window by window to a hidden temp file, renamed into place
    by :meth:`close` only when everything was written, so an interrupted run leaves no file that
    looks finished.

    With ``cog=True`` the finished temp raster is converted to a Cloud-Optimized GeoTIFF (GDAL's
    COG driver: tiled, deflate-compressed, internal overviews resampled with
    ``overview_resampling``) before the rename; the conversion reads the temp raster block by
    block, so memory stays flat. ``nbits=16`` stores float32 bands as half floats (float16).
    """

    def __init__(
        self,
        path: str | Path,
        height: int,
        width: int,
        georef: Georef,
        count: int = 1,
        dtype: str = "uint8",
        nodata=None,
        descriptions: Sequence[str] | None = None,
        colormap: dict | None = None,
        cog: bool = False,
        overview_resampling: str = "nearest",
        nbits: int | None = None,
        block: int = 256,
    ):
        self.path = Path(path)
        self.cog = cog
        self.overview_resampling = overview_resampling
        self.nbits = nbits
        self.block = block
        self._out = AtomicFile(self.path)
        self._tmp = self._out.tmp
        try:
            self._open(height, width, georef, count, dtype, nodata, descriptions, colormap)
        except BaseException:  # also SIGTERM's SystemExit: no temp file left behind
            if getattr(self, "_ds", None) is not None:
                self._ds.close()
            self._out.abort()
            raise

    def _open(self, height, width, georef, count, dtype, nodata, descriptions, colormap):
        import rasterio

        block = self.block
        profile = dict(
            driver="GTiff",
            height=height,
            width=width,
            count=count,
            dtype=dtype,
            compress="deflate",
            interleave="pixel" if count > 1 else "band",
        )
        if nodata is not None:
            profile["nodata"] = nodata
        if self.nbits is not None:
            profile["nbits"] = self.nbits
        if height >= block and width >= block:
            profile.update(tiled=True, blockxsize=block, blockysize=block)
        if georef.crs is not None:
            profile["crs"] = georef.crs
        if georef.transform is not None:
            profile["transform"] = georef.transform
        self._ds = rasterio.open(self._tmp, "w", **profile)
        if georef.gcps:
            self._ds.gcps = georef.gcps
        if georef.rpcs:
            self._ds.rpcs = georef.rpcs
        if descriptions:
            for i, d in enumerate(descriptions, start=1):
                self._ds.set_band_description(i, str(d))
        if colormap:
            self._ds.write_colormap(1, colormap)

    def write_bands(self, y: int, x: int, data: np.ndarray) -> None:
        """Write ``data`` (count, h, w) at row ``y``, column ``x``."""
        from rasterio.windows import Window

        _, h, w = data.shape
        self._ds.write(data, window=Window(x, y, w, h))

    def finish(self) -> AtomicFile:
        """Close the raster (and convert it to a COG); the complete file waits under its temp
        name: ``.commit()`` the returned :class:`AtomicFile` to rename it into place, or
        ``.abort()`` it. On an error the temp file is removed."""
        try:
            self._ds.close()
            if self.cog:
                stage = temp_name(self.path)  # the GTiff; the COG is written under the temp name
                os.replace(self._tmp, stage)
                try:
                    to_cog(stage, self._tmp, self.overview_resampling, self.nbits, self.block)
                finally:
                    stage.unlink(missing_ok=True)
        except BaseException:
            self._out.abort()
            raise
        return self._out

    def close(self, ok: bool = True) -> None:
        """Finish and rename into place (``ok``) or discard; the final name only ever holds a
        whole file."""
        if ok:
            self.finish().commit()
        else:
            with contextlib.suppress(Exception):
                self._ds.close()
            self._out.abort()


def to_cog(
    src: str | Path,
    dst: str | Path,
    overview_resampling: str = "nearest",
    nbits: int | None = None,
    block: int = 256,
) -> None:
    """Copy raster ``src`` to a Cloud-Optimized GeoTIFF ``dst`` (GDAL COG driver)."""
    import rasterio.shutil

    opts = dict(
        driver="COG",
        compress="deflate",
        blocksize=block,
        overview_resampling=overview_resampling,
        num_threads=1,
    )
    if nbits is not None:
        opts["nbits"] = nbits
    rasterio.shutil.copy(str(src), str(dst), **opts)


class GeoTiffWriter(RasterWriter):
    """The single-band uint8 class-id raster: CRS and transform of the source, ``nodata_value``
    as nodata and a colour table (``colors[i]`` for class ``i``; nodata black and transparent);
    COG overviews are nearest-neighbour so they hold real class ids."""

    def __init__(
        self,
        path: str | Path,
        height: int,
        width: int,
        georef: Georef,
        colors: Sequence[Sequence[int]],
        nodata_value: int = 255,
        block: int = 256,
        cog: bool = False,
    ):
        cmap = {i: (*map(int, c), 255) for i, c in enumerate(colors)}
        cmap[nodata_value] = (0, 0, 0, 0)
        super().__init__(
            path,
            height,
            width,
            georef,
            nodata=nodata_value,
            colormap=cmap,
            cog=cog,
            overview_resampling="nearest",
            block=block,
        )

    def write(self, y: int, x: int, ids: np.ndarray) -> None:
        self.write_bands(y, x, ids.astype(np.uint8)[None])

    def add(self, y: int, x: int, ids: np.ndarray, rgb: np.ndarray, probs=None) -> None:
        """Sink interface of :func:`~segclip_d2.predict.blocks.predict_source`."""
        self.write(y, x, ids)


PROB_DTYPES = ("uint8", "float")


class ProbabilityWriter(RasterWriter):
    """``K`` bands of class probability, band ``i`` described by ``class_names[i]``.

    ``dtype="uint8"``: probability * 255 rounded (0..255); ``"float"``: float16 (float32 bands
    stored with 16 bits), NaN where the input has no data. In the uint8 form no-data pixels are 0
    in every band (the class map's 255 marks them).
    """

    def __init__(self, path, height, width, georef, class_names, dtype="uint8", cog=False):
        if dtype not in PROB_DTYPES:
            raise ValueError(f"--probabilities must be one of {PROB_DTYPES}, got {dtype!r}")
        self.kind = dtype
        is_float = dtype == "float"
        super().__init__(
            path,
            height,
            width,
            georef,
            count=len(class_names),
            dtype="float32" if is_float else "uint8",
            nodata=float("nan") if is_float else None,
            descriptions=class_names,
            cog=cog,
            overview_resampling="average",
            nbits=16 if is_float else None,
        )
        self.num_classes = len(class_names)

    def _encode(self, values: np.ndarray, invalid: np.ndarray) -> np.ndarray:
        if self.kind == "float":
            out = values.astype(np.float32)
            out[:, invalid] = np.nan
            return out
        out = np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
        out[:, invalid] = 0
        return out

    def add(self, y, x, ids, rgb, probs=None) -> None:
        h, w = ids.shape
        invalid = ids == 255
        if probs is None:
            probs = np.zeros((self.num_classes, h, w), np.float32)
        if probs.shape != (self.num_classes, h, w):
            raise ValueError(
                f"{self.path}: {self.num_classes} class names but probabilities of shape "
                f"{probs.shape}"
            )
        self.write_bands(y, x, self._encode(probs, invalid))


class ConfidenceWriter(ProbabilityWriter):
    """Two bands: top-1 class probability and margin (top-1 minus top-2), same encodings as
    :class:`ProbabilityWriter`."""

    BANDS = ("top1_probability", "margin_top1_top2")

    def __init__(self, path, height, width, georef, dtype="uint8", cog=False):
        super().__init__(path, height, width, georef, self.BANDS, dtype, cog)

    def add(self, y, x, ids, rgb, probs=None) -> None:
        h, w = ids.shape
        invalid = ids == 255
        self.write_bands(y, x, self._encode(confidence_bands(probs, (h, w)), invalid))


def confidence_bands(probs: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    """(2, h, w) float32: top-1 probability and top-1 minus top-2 of ``probs`` (K, h, w)."""
    if probs is None:
        return np.zeros((2, *shape), np.float32)
    if probs.shape[0] == 1:
        return np.stack([probs[0], probs[0]]).astype(np.float32)
    top2 = np.partition(probs, probs.shape[0] - 2, axis=0)[-2:]  # (2, h, w): 2nd, 1st
    return np.stack([top2[1], top2[1] - top2[0]]).astype(np.float32)
