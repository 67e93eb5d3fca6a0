"""Input bands: names, the position of the visible red, green and blue bands, reading N-band tiles.

Band names are lower-case words in file order (``INPUT.BANDS``, ``dataset.yaml``'s ``bands``).
``red``, ``green`` and ``blue`` are the visible bands: the CLIP backbone's pretrained RGB kernels
go to them and the photometric augmentation's hue and saturation act on them; any other band
(``nir``, ``swir1``, ``dsm``, ...) is an extra band.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..utils.bands import RGB_NAMES as RGB_BANDS
from ..utils.bands import check_band_names

__all__ = ["RGB_BANDS", "check_band_names", "display_rgb", "read_tiff_bands", "rgb_indices"]
TIFF_SUFFIXES = (".tif", ".tiff")


def rgb_indices(bands: Sequence[str]) -> tuple[int, int, int] | None:
    """Positions of ``red``, ``green``, ``blue`` in ``bands``, or None when one is missing."""
    names = [str(b).lower() for b in bands]
    if not all(c in names for c in RGB_BANDS):
        return None
    return tuple(names.index(c) for c in RGB_BANDS)


def read_tiff_bands(path: str | Path) -> np.ndarray:
    """All bands of a (Geo)TIFF as (H, W, C): uint8 kept, any other type as float32."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                data = src.read()  # (C, H, W)
    except RasterioError as e:
        raise ValueError(f"{path}: cannot read the image ({e})") from e
    data = data.transpose(1, 2, 0)
    return data if data.dtype == np.uint8 else data.astype(np.float32)


def display_rgb(image: np.ndarray, bands: Sequence[str]) -> np.ndarray:
    """An (H, W, C) image of ``bands`` as (H, W, 3) uint8 RGB for looking at: the red, green and
    blue bands (the first band as grey without them); other than uint8, each band stretched
    between its 2nd and 98th percentiles."""
    from ..raster.sources import apply_stretch, stretch_limits

    idx = rgb_indices(bands) if len(bands) == image.shape[2] else None
    rgb = image[..., list(idx)] if idx is not None else np.repeat(image[..., :1], 3, axis=2)
    if rgb.dtype == np.uint8:
        return np.ascontiguousarray(rgb)
    return np.stack([apply_stretch(b, *stretch_limits(b)) for b in rgb.transpose(2, 0, 1)], -1)
