"""Reading images and rasters for inference (writing is :mod:`.writers`).

Two sources share one interface (``height``, ``width``, ``read(y, x, h, w)``):

- :class:`ArraySource` for ordinary image files (PNG, JPEG, BMP, WebP), decoded at once with
  OpenCV and shown as a viewer shows them (the EXIF orientation is applied);
- :class:`GeoTiffSource` for rasters GDAL reads (``.tif``/``.tiff``, ``.vrt``, JPEG 2000 such
  as Sentinel-2 tiles, remote paths), read window by window with rasterio so memory does not
  grow with the raster. Georeferencing is kept: CRS and transform, or GCPs (and RPCs) for a
  raster referenced only by those.

Band handling (both sources):

- band meaning comes from the colour interpretation (GeoTIFF tags; for PNG/JPEG/WebP the format's
  channel layout): bands tagged red/green/blue are used as RGB; alpha is taken only from a band
  tagged alpha (0 = no-data), or from the raster's mask/nodata;
- a paletted band is expanded through its colour table (a colour with alpha 0 is no-data);
- 3 untagged bands -> used as RGB in order; 1 band (grayscale) -> replicated to 3 channels with
  a warning (the model was trained on RGB);
- more than 3 bands without RGB tags (e.g. NIR,R,G,B) -> an error asking for ``--bands R,G,B``
  (1-based, ``bands=(r, g, b)`` from Python), never a guess;
- a file whose decoder reports truncation or an error is an :class:`InputError`: JPEG, WebP, BMP
  are decoded once more by PIL, which fails on truncation where OpenCV alone fills a truncated
  JPEG with grey (9 ms for a 1024x1024 JPEG at 1/8 scale, vs 25 ms for OpenCV's decode); PNG
  errors already fail OpenCV's libpng decode; rasters fail in GDAL, whose own error text is in
  the message (JPEG 2000 goes to GDAL only: a second decoder must not reject what GDAL reads).
- 8-bit data is used as is. Any other data type (16-bit, 32-bit, float) is stretched per band
  from its 2nd..98th percentile to 0..255; the percentiles are computed once per raster (from a
  decimated read for GeoTIFFs, excluding no-data) so every window uses the same stretch.

A model of other bands than RGB 0..255 (``model_bands``/``values`` of :func:`open_source`, from
its card: N bands, or statistics of 16-bit data) gets its bands in its own order, chosen by
number (``--bands``, one per model band) or by name (the raster's band descriptions, or colour
tags red/green/blue), or all of an unnamed raster's bands in file order when their count is the
model's; anything else is an :class:`InputError` listing the raster's bands and the model's.
Their values are passed unscaled (the model normalises them with its dataset statistics); only
the previews (``source.display``) stretch them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from ..utils.bands import AS_READ, RGB_NAMES

logger = logging.getLogger(__name__)

GEOTIFF_EXTS = (".tif", ".tiff")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".jp2") + GEOTIFF_EXTS
STRETCH_PERCENTILES = (2.0, 98.0)
# Pixels sampled (at most) to compute a GeoTIFF's stretch percentiles.
_STRETCH_SAMPLE_PIXELS = 1 << 20


class InputError(ValueError):
    """An input that cannot be used; the message names the file and the problem."""


class BandChoiceError(InputError):
    """The bands of an input cannot be matched to the model's without ``--bands`` (or the
    ``--bands`` given do not exist in it): a usage problem, found from the header alone
    (:func:`check_input_bands`), so a run refuses it before writing anything."""


# Read through rasterio (window by window) besides GeoTIFFs: GDAL virtual mosaics.
RASTER_EXTS = GEOTIFF_EXTS + (".vrt", ".jp2", ".j2k")


def is_remote(path: str | Path) -> bool:
    """A GDAL virtual-file path or URL (``/vsicurl/...``, ``s3://...``, ``https://...``)."""
    p = str(path)
    return p.startswith("/vsi") or "://" in p


def is_geotiff(path: str | Path) -> bool:
    return Path(str(path)).suffix.lower() in GEOTIFF_EXTS


def is_raster_path(path: str | Path) -> bool:
    """Inputs read with rasterio window by window (GeoTIFF, VRT, remote sources); everything
    else is decoded whole with OpenCV."""
    return is_remote(path) or Path(str(path)).suffix.lower() in RASTER_EXTS


def parse_bands(text: str | None) -> tuple[int, ...] | None:
    """``"3,2,1"`` -> ``(3, 2, 1)`` (1-based band numbers); ``None``/``""`` -> ``None``."""
    if not text:
        return None
    try:
        bands = tuple(int(b) for b in str(text).split(","))
    except ValueError:
        raise ValueError(f"--bands must be comma-separated band numbers, got {text!r}") from None
    if min(bands) < 1:
        raise ValueError(f"--bands needs band numbers starting at 1, got {text!r}")
    return bands


def check_band_count(bands: Sequence[int] | None, model_bands: Sequence[str] | None) -> None:
    """``ValueError`` when ``--bands`` gives a count the model cannot read: 3 (or 1, replicated)
    for an RGB model (``model_bands`` None or red, green, blue), one per input band otherwise."""
    if bands is None:
        return
    names = list(model_bands or RGB_NAMES)
    if names == list(RGB_NAMES):
        if len(bands) not in (1, 3):
            raise ValueError(f"--bands needs 3 (or 1) band numbers, got {len(bands)}")
    elif len(bands) != len(names):
        raise ValueError(
            f"--bands gives {len(bands)} band(s) but the model reads {len(names)} "
            f"({','.join(names)}); give {len(names)} band numbers in that order"
        )


def stretch_limits(band: np.ndarray, valid: np.ndarray | None = None) -> tuple[float, float]:
    """The (low, high) percentiles of a band's valid, finite values."""
    vals = band if valid is None else band[valid]
    vals = vals[np.isfinite(vals)] if vals.dtype.kind == "f" else vals
    if vals.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(vals, STRETCH_PERCENTILES)
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def apply_stretch(band: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linearly map ``[lo, hi]`` to ``[0, 255]`` (clipped) -> uint8; NaN -> 0."""
    out = (band.astype(np.float32) - lo) * (255.0 / (hi - lo))
    out = np.nan_to_num(out, nan=0.0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _choose_bands(
    path: str,
    count: int,
    bands: Sequence[int] | None,
    interp: Sequence[str],
    log: logging.Logger = logger,
) -> tuple[tuple[int, ...], int | None]:
    """Pick (RGB band numbers, alpha band number or None) for a raster with ``count`` bands
    whose colour interpretations are ``interp`` ("red", "green", "blue", "alpha", "gray",
    "undefined", ...; one per band). Band meaning comes only from these tags: an untagged
    band is never taken for alpha, and more than 3 bands without RGB tags are refused."""
    alpha = interp.index("alpha") + 1 if "alpha" in interp else None
    if bands is not None:
        check_band_count(bands, None)
        bad = [b for b in bands if b > count]
        if bad:
            raise BandChoiceError(
                f"{path}: --bands {list(bands)} but the image has {count} band(s)"
            )
        alpha = alpha if alpha not in bands else None
        if len(bands) == 1:
            log.warning("%s: band %d replicated to 3 grey channels", path, bands[0])
            return (bands[0],) * 3, alpha
        return tuple(bands), alpha
    if all(c in interp for c in ("red", "green", "blue")):
        return tuple(interp.index(c) + 1 for c in ("red", "green", "blue")), alpha
    data = [i + 1 for i, c in enumerate(interp) if c != "alpha"]
    if len(data) == 3 and count == 3:  # three untagged bands: the usual RGB order
        return tuple(data), None
    if len(data) == 3 and alpha is not None:
        log.info("%s: bands %s untagged, used as R,G,B (band %d is alpha)", path, data, alpha)
        return tuple(data), alpha
    if len(data) == 1:
        log.warning("%s: single-band (grayscale) image replicated to 3 channels", path)
        return (data[0],) * 3, alpha
    tags = ", ".join(f"{i + 1}={c}" for i, c in enumerate(interp))
    raise BandChoiceError(
        f"{path}: {count} bands ({tags}) and no colour tags telling which are red, green and "
        "blue; choose three with --bands R,G,B (1-based, e.g. --bands 3,2,1 for B,G,R,NIR "
        "or --bands 2,3,4 for NIR,R,G,B)"
    )


def _choose_model_bands(
    path: str,
    bands: Sequence[int] | None,
    names: Sequence[str],
    model_bands: Sequence[str],
    log: logging.Logger = logger,
) -> tuple[tuple[int, ...], int | None]:
    """Pick (band numbers in the model's order, alpha band number or None) for a model of the
    bands ``model_bands`` from a raster whose bands are named ``names`` (band description or
    colour tag, lower case, "" when none): by number (``bands``, 1-based), else by name, else
    all the raster's bands in file order when none is named and their count is the model's."""
    count, n = len(names), len(model_bands)
    alpha = names.index("alpha") + 1 if "alpha" in names else None
    if bands is not None:
        check_band_count(bands, model_bands)
        if max(bands) > count:
            raise BandChoiceError(
                f"{path}: --bands {list(bands)} but the image has {count} band(s)"
            )
        return tuple(bands), alpha if alpha not in bands else None
    if all(m in names for m in model_bands):
        return tuple(names.index(m) + 1 for m in model_bands), alpha
    data = [i + 1 for i, c in enumerate(names) if c != "alpha"]
    if len(data) == n and not any(names[i - 1] for i in data):
        log.info("%s: %d unnamed bands used in file order as %s", path, n, list(model_bands))
        return tuple(data), alpha
    found = ", ".join(f"{i + 1}={c or 'unnamed'}" for i, c in enumerate(names))
    raise BandChoiceError(
        f"{path}: {count} band(s) ({found}) but the model reads {n} ({','.join(model_bands)}); "
        f"name them in the raster's band descriptions or choose {n} with --bands (1-based, "
        "in the model's order)"
    )


def _band_names(descriptions: Sequence[str | None], interp: Sequence[str]) -> list[str]:
    """Each band's name: its description, else its colour tag when red, green, blue or alpha."""
    tags = (*RGB_NAMES, "alpha")
    return [
        (d or "").strip().lower() or (c if c in tags else "") for d, c in zip(descriptions, interp)
    ]


def _as_model_input(chans: Sequence[np.ndarray]) -> np.ndarray:
    """(h, w, C) of the chosen bands: uint8 kept, anything else float32 with NaN as 0."""
    data = np.stack(chans, axis=-1)
    if data.dtype == np.uint8:
        return np.ascontiguousarray(data)
    return np.nan_to_num(data.astype(np.float32, copy=False), nan=0.0)


def model_band_names(
    model_bands: Sequence[str] | None, values: str | None = None
) -> tuple[str, ...] | None:
    """The band names a source picks for a model, or None for an RGB 0..255 model (colour
    tags, 1 grey band replicated, other data types stretched: the RGB rules above)."""
    if model_bands is None:
        return None
    names = tuple(str(b).strip().lower() for b in model_bands)
    return None if names == RGB_NAMES and values != AS_READ else names


class BandDisplay:
    """(h, w, C) model bands -> (h, w, 3) uint8 RGB for previews: the red, green and blue bands
    of ``model_bands`` (else the first band as grey), each stretched between the raster's
    ``limits`` (one (lo, hi) or None per band: None = 8-bit, shown as is). Identity for RGB."""

    def __init__(self, model_bands: Sequence[str] | None = None, limits=None):
        self.model_bands = model_bands
        if model_bands is not None:
            names = list(model_bands)
            rgb = all(c in names for c in RGB_NAMES)
            self.index = [names.index(c) for c in RGB_NAMES] if rgb else [0, 0, 0]
            self.limits = [limits[i] for i in self.index]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if self.model_bands is None:
            return image
        chans = []
        for i, lim in zip(self.index, self.limits):
            band = image[..., i]
            chans.append(band.astype(np.uint8) if lim is None else apply_stretch(band, *lim))
        return np.ascontiguousarray(np.stack(chans, axis=-1))


def _format_interp(count: int) -> list[str]:
    """Band meaning of an ordinary image file by channel count (fixed by the formats: PNG,
    WebP, JPEG, BMP store gray, gray+alpha, RGB or RGBA)."""
    return {
        1: ["gray"],
        2: ["gray", "alpha"],
        3: ["red", "green", "blue"],
        4: ["red", "green", "blue", "alpha"],
    }.get(count, ["undefined"] * count)


def verify_decodes(path: str) -> None:
    """Decode ``path`` fully with PIL, which reports truncation and decoder errors (OpenCV's
    decoders only print "Premature end of JPEG file" and fill the rest with grey). JPEGs are
    decoded at 1/8 scale (the whole entropy-coded stream is still read). Formats PIL does not
    know are left to OpenCV."""
    from PIL import Image, ImageFile, UnidentifiedImageError

    previous = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = False, None
    try:
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except UnidentifiedImageError:
        return
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError(
            f"{path}: the image decoder failed ({' '.join(str(e).split())}); the file is "
            "truncated or corrupt"
        ) from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = previous


def gdal_reason(err: BaseException) -> str:
    """GDAL's own error text behind a rasterio exception (rasterio's message is often only
    "Read failed. See previous exception for details."): the innermost GDAL message."""
    texts = []
    seen = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = " ".join(str(e).split())
        if text and "see previous exception" not in text.lower():
            texts.append(text)
        e = e.__cause__ or e.__context__
    return texts[-1] if texts else type(err).__name__


# EXIF orientation tag (0x0112) -> how the stored (h, w, c) pixels become the displayed image.
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}


def exif_orientation(path: str) -> int:
    """The EXIF orientation of an image file (1 = as stored; also when it has no EXIF)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return int(im.getexif().get(0x0112, 1) or 1)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return 1


def apply_orientation(raw: np.ndarray, orientation: int, path: str = "") -> np.ndarray:
    """``raw`` (h, w, c) turned as a viewer shows an image with this EXIF orientation."""
    if orientation == 1:
        return raw
    if orientation not in _ORIENT:
        raise InputError(f"{path}: unknown EXIF orientation {orientation} (valid: 1..8)")
    logger.info("%s: EXIF orientation %d applied (predicted as displayed)", path, orientation)
    return np.ascontiguousarray(_ORIENT[orientation](raw))


class _Source:
    """What every source is opened with: the file (or GDAL source), ``bands`` (1-based, from
    ``--bands``) and, for a model that is not 8-bit RGB, its band names and value kind."""

    def __init__(
        self,
        path: str | Path,
        bands: Sequence[int] | None = None,
        model_bands: Sequence[str] | None = None,
        values: str | None = None,
    ):
        self.path = str(path)
        if not is_remote(self.path) and not os.path.isfile(self.path):
            raise InputError(f"{self.path}: no such file")
        self._open(bands, model_band_names(model_bands, values))

    def _open(self, bands: Sequence[int] | None, model: list[str] | None) -> None:
        raise NotImplementedError


class ArraySource(_Source):
    """An ordinary image file decoded into memory."""

    is_geotiff = False
    display = BandDisplay()
    crs = None
    transform = None
    nodata = None

    def _open(self, bands: Sequence[int] | None, model: list[str] | None) -> None:
        raw = self._decode()
        count = raw.shape[2]
        if model is not None:  # the model's bands as read (no stretch)
            names = _band_names([None] * count, _format_interp(count))
            chosen, alpha_band = _choose_model_bands(self.path, bands, names, model)
            self.rgb = _as_model_input([raw[:, :, b - 1] for b in chosen])  # (H, W, C)
            self.valid = np.ones(raw.shape[:2], dtype=bool)
            if alpha_band is not None:
                self.valid = raw[:, :, alpha_band - 1] > 0
            if self.rgb.dtype != np.uint8:
                self.valid &= np.isfinite(raw[:, :, [b - 1 for b in chosen]]).all(axis=2)
            limits = [
                None if raw.dtype == np.uint8 else stretch_limits(self.rgb[..., i], self.valid)
                for i in range(len(chosen))
            ]
            self.display = BandDisplay(model, limits)
        else:
            self._rgb(raw, bands)
            self.display = BandDisplay()
        self.height, self.width = self.rgb.shape[:2]

    def _decode(self) -> np.ndarray:
        """The file's pixels (H, W, count) as displayed, band 1 red for colour images."""
        raw = cv2.imread(self.path, cv2.IMREAD_UNCHANGED)
        if raw is None or raw.size == 0:
            raise InputError(f"{self.path}: cannot be decoded (corrupt file or unsupported format)")
        if Path(self.path).suffix.lower() != ".png":  # libpng's errors already fail cv2.imread
            verify_decodes(self.path)
        if raw.ndim == 2:
            raw = raw[:, :, None]
        raw = apply_orientation(raw, exif_orientation(self.path), self.path)
        count = raw.shape[2]
        # OpenCV decodes colour as BGR(A); make band 1 red like every other reader.
        if count in (3, 4):
            raw = raw[:, :, [2, 1, 0] + ([3] if count == 4 else [])]
        return raw

    def _rgb(self, raw: np.ndarray, bands: Sequence[int] | None) -> None:
        """``self.rgb`` (H, W, 3) uint8 and ``self.valid`` by the RGB rules."""
        count = raw.shape[2]
        rgb_bands, alpha_band = _choose_bands(self.path, count, bands, _format_interp(count))
        valid = np.ones(raw.shape[:2], dtype=bool)
        if alpha_band is not None:
            valid = raw[:, :, alpha_band - 1] > 0
        chans = []
        for b in rgb_bands:
            band = raw[:, :, b - 1]
            if band.dtype != np.uint8:
                if band.dtype.kind == "f":
                    valid &= np.isfinite(band)
                lo, hi = stretch_limits(band, valid)
                logger.info(
                    "%s: band %d (%s) stretched %g..%g -> 0..255", self.path, b, band.dtype, lo, hi
                )
                band = apply_stretch(band, lo, hi)
            chans.append(band)
        self.rgb = np.ascontiguousarray(np.stack(chans, axis=-1))  # (H, W, 3) uint8
        self.valid = valid  # (H, W) bool

    def read(self, y: int, x: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """RGB (h, w, 3) uint8 (an N-band model's bands: (h, w, N)) and validity (h, w) bool
        of a window."""
        return self.rgb[y : y + h, x : x + w], self.valid[y : y + h, x : x + w]

    def close(self) -> None:
        pass


class GeoTiffSource(_Source):
    """A raster read window by window with rasterio: (Geo)TIFF, VRT mosaic, or any source GDAL
    opens (``/vsicurl/https://...``, ``s3://bucket/key.tif``; rasterio maps ``s3://`` to
    ``/vsis3/``)."""

    is_geotiff = True

    def _open(self, bands: Sequence[int] | None, model: list[str] | None) -> None:
        import rasterio

        try:
            self._ds = rasterio.open(self.path)
        except rasterio.errors.RasterioError as e:
            raise InputError(
                f"{self.path}: cannot be opened as a raster ({gdal_reason(e)})"
            ) from None
        ds = self._ds
        self.model_bands = model
        try:
            self._setup(bands)
        except Exception:
            ds.close()
            raise

    def _setup(self, bands: Sequence[int] | None) -> None:
        from rasterio.enums import MaskFlags

        ds = self._ds
        self._choose(bands)
        self.height, self.width = ds.height, ds.width
        self.crs, self.transform, self.nodata = ds.crs, ds.transform, ds.nodata
        # A raster referenced by ground control points only has the identity transform.
        self.gcps, self.gcps_crs = ds.gcps if ds.gcps and ds.gcps[0] else (None, None)
        if self.gcps:
            self.crs, self.transform = None, None
        self.rpcs = ds.rpcs
        dtypes = {ds.dtypes[b - 1] for b in self.bands}
        if any(np.dtype(d).kind == "c" for d in dtypes):
            raise InputError(f"{self.path}: complex-valued rasters are not supported")
        # No-data from the used bands' masks (nodata value or internal mask). Masks GDAL
        # derives from an alpha band are left out: alpha is read explicitly, and only when
        # the band tagged alpha is not used as a colour (--bands).
        flags = [ds.mask_flag_enums[b - 1] for b in sorted(set(self.bands))]
        self._masked = all(MaskFlags.all_valid not in f and MaskFlags.alpha not in f for f in flags)
        self._limits: dict[int, tuple[float, float]] = {}
        self.display = BandDisplay()
        if self.model_bands is not None:  # unscaled input; the preview's stretch only
            uint8 = [np.dtype(ds.dtypes[b - 1]) == np.uint8 for b in self.bands]
            limits = [None if u else self._percentiles(b) for b, u in zip(self.bands, uint8)]
            self.display = BandDisplay(self.model_bands, limits)
            return
        for b in sorted(set(self.bands)):
            if np.dtype(ds.dtypes[b - 1]) != np.uint8 and self.palette is None:
                self._limits[b] = self._percentiles(b)
                logger.info(
                    "%s: band %d (%s) stretched %g..%g -> 0..255",
                    self.path,
                    b,
                    ds.dtypes[b - 1],
                    *self._limits[b],
                )

    def _choose(self, bands: Sequence[int] | None) -> None:
        """``self.bands``, ``self.alpha_band`` and ``self.palette`` (RGB rules or by name)."""
        ds = self._ds
        interp = [c.name for c in ds.colorinterp]
        self.palette = None
        if self.model_bands is not None:  # the model's bands as read (no stretch, no palette)
            names = _band_names(ds.descriptions, interp)
            chosen = _choose_model_bands(self.path, bands, names, self.model_bands)
            self.bands, self.alpha_band = chosen
            return
        if interp == ["palette"] and not bands:
            self.palette = _palette_lut(ds)
        if self.palette is not None:
            self.bands, self.alpha_band = (1, 1, 1), None
            logger.info("%s: paletted band expanded through its colour table", self.path)
        else:
            self.bands, self.alpha_band = _choose_bands(self.path, ds.count, bands, interp)

    def _percentiles(self, band: int) -> tuple[float, float]:
        """Stretch limits of one band from a decimated read (bounded memory)."""
        ds = self._ds
        step = max(1.0, (ds.height * ds.width / _STRETCH_SAMPLE_PIXELS) ** 0.5)
        shape = (max(1, int(ds.height / step)), max(1, int(ds.width / step)))
        with self._read_errors():
            data = ds.read(band, out_shape=shape, masked=True)
        valid = ~np.ma.getmaskarray(data)
        return stretch_limits(np.ma.getdata(data), valid)

    def read(self, y: int, x: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """RGB (h, w, 3) uint8 and validity (h, w) bool of a window.

        A pixel is invalid (no-data) when every used band is masked there (nodata value or
        internal mask) or its alpha is 0.
        """
        from rasterio.windows import Window

        with self._read_errors():
            return self._read(Window(x, y, w, h))

    @contextlib.contextmanager
    def _read_errors(self):
        """A failed read (truncated or corrupt file) is an :class:`InputError` carrying GDAL's
        own error text."""
        import rasterio

        try:
            yield
        except rasterio.errors.RasterioError as e:
            raise InputError(
                f"{self.path}: read failed ({gdal_reason(e)}); the file is truncated or corrupt"
            ) from None

    def _read(self, win) -> tuple[np.ndarray, np.ndarray]:
        ds = self._ds
        h, w = int(win.height), int(win.width)
        uniq = sorted(set(self.bands))
        data = ds.read(uniq, window=win)  # (n, h, w)
        if self.palette is not None:
            colours = self.palette[data[0]]  # (h, w, 4)
            valid = colours[..., 3] > 0
            if self.nodata is not None:
                valid &= data[0] != self.nodata
            return np.ascontiguousarray(colours[..., :3]), valid
        chans = []
        for b in self.bands:
            band = data[uniq.index(b)]
            if b in self._limits:
                band = apply_stretch(band, *self._limits[b])
            chans.append(band)
        rgb = np.stack(chans, axis=-1) if self.model_bands is None else _as_model_input(chans)
        valid = np.ones((h, w), dtype=bool)
        if self._masked:
            masks = ds.read_masks(uniq, window=win)  # (n, h, w) 0 = no-data
            valid = (masks > 0).any(axis=0)
        if self.alpha_band is not None:
            valid &= ds.read(self.alpha_band, window=win) > 0
        for b in uniq:
            if np.dtype(ds.dtypes[b - 1]).kind == "f":
                valid &= np.isfinite(data[uniq.index(b)])
        return rgb, valid

    def close(self) -> None:
        self._ds.close()


def _palette_lut(ds) -> np.ndarray | None:
    """(N, 4) uint8 RGBA of every index of band 1's colour table (missing entries transparent)."""
    try:
        cmap = ds.colormap(1)
    except ValueError:  # tagged palette without a table: read as grey
        return None
    size = 1 << (8 * np.dtype(ds.dtypes[0]).itemsize)
    lut = np.zeros((max(size, max(cmap) + 1), 4), np.uint8)
    for i, c in cmap.items():
        lut[i] = c
    return lut


# The band choosers' logger for header checks, whose choice the full read logs again.
_SILENT = logging.getLogger(__name__ + ".header_check")
_SILENT.disabled = True
# PIL modes of ordinary image files -> the channels OpenCV decodes them to (other modes, e.g.
# paletted "P" with or without transparency, are left to the full read).
_PIL_MODE_BANDS = {"1": 1, "L": 1, "I": 1, "I;16": 1, "F": 1, "LA": 2, "RGB": 3, "RGBA": 4}


def _header_band_names(path: str) -> tuple[int, list[str], list[str]] | None:
    """(count, colour interpretations, band names) from the header of ``path`` without reading
    pixels, or None when the header alone does not tell (or cannot be read: the full read
    reports that)."""
    if is_raster_path(path):
        import rasterio

        try:
            with rasterio.open(path) as ds:
                interp = [c.name for c in ds.colorinterp]
                return ds.count, interp, _band_names(ds.descriptions, interp)
        except rasterio.errors.RasterioError:
            return None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            count = _PIL_MODE_BANDS.get(im.mode)
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    if count is None:
        return None
    interp = _format_interp(count)
    return count, interp, _band_names([None] * count, interp)


def check_input_bands(
    path: str | Path,
    bands: Sequence[int] | None = None,
    model_bands: Sequence[str] | None = None,
    values: str | None = None,
) -> None:
    """:class:`BandChoiceError` when the bands of ``path`` cannot be chosen for the model (the
    rules of :func:`open_source`), decided from the file's header only; missing, remote or
    unreadable files pass here (their full read reports them)."""
    path = str(path)
    if is_remote(path) or not os.path.isfile(path):
        return
    header = _header_band_names(path)
    if header is None:
        return
    count, interp, names = header
    model = model_band_names(model_bands, values)
    # silent: the full read logs the choice (grey replicated, ...)
    if model is not None:
        _choose_model_bands(path, bands, names, model, _SILENT)
    elif not (interp == ["palette"] and not bands):
        _choose_bands(path, count, bands, interp, _SILENT)


def read_whole(
    path: str | Path,
    bands: Sequence[int] | None = None,
    model_bands: Sequence[str] | None = None,
    values: str | None = None,
) -> np.ndarray:
    """All pixels of ``path`` as :func:`open_source` gives them for the model: (H, W, C)."""
    src = open_source(path, bands, model_bands, values)
    try:
        return np.array(src.read(0, 0, src.height, src.width)[0])
    finally:
        src.close()


def open_source(
    path: str | Path,
    bands: Sequence[int] | None = None,
    model_bands: Sequence[str] | None = None,
    values: str | None = None,
):
    """An :class:`ArraySource` or :class:`GeoTiffSource` for ``path``; ``model_bands`` and
    ``values`` (a model card's ``input.bands``/``input.values``) choose the bands by the RGB
    rules or, for any other model, by name or number, unscaled (:func:`model_band_names`)."""
    cls = GeoTiffSource if is_raster_path(path) else ArraySource
    return cls(path, bands, model_bands, values)
