"""Ground resolution: predict a raster at the ground sample distance (GSD) the model was trained
at, and return the prediction on the raster's own grid.

``--gsd auto`` compares the raster's pixel size (from its transform, projected CRS in metres) with
the model's training GSD and resamples when they differ by more than :data:`AUTO_TOLERANCE`;
``--gsd METRES`` predicts at that GSD; ``--gsd off`` never resamples.
"""

from __future__ import annotations

import logging
import math

logger = logging.getLogger(__name__)

# Relative pixel-size difference above which --gsd auto resamples.
AUTO_TOLERANCE = 0.10
# Pixel sizes --gsd accepts (metres): from close-range drone imagery to coarse satellite data.
GSD_RANGE_M = (0.01, 1000.0)
# Largest resampling factor either way (a block grows by its square in memory).
MAX_SCALE = 16.0


def model_gsd(cfg) -> float | None:
    """The model's training GSD in metres (``INPUT.GSD_M``), or ``None`` when unknown."""
    value = cfg.INPUT.get("GSD_M", None) if hasattr(cfg.INPUT, "get") else None
    try:
        value = float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
    return value if value and value > 0 else None


def parse_gsd(text: str) -> str | float:
    """``"auto"`` / ``"off"`` / a positive number of metres."""
    t = str(text).strip().lower()
    if t in ("auto", "off"):
        return t
    try:
        v = float(t)
    except ValueError:
        raise ValueError(
            f"--gsd must be auto, off or a pixel size in metres, got {text!r}"
        ) from None
    lo, hi = GSD_RANGE_M
    if not (math.isfinite(v) and lo <= v <= hi):
        raise ValueError(f"--gsd must be a pixel size of {lo:g} to {hi:g} metres, got {text!r}")
    return v


def metres_per_unit(crs, transform) -> float | None:
    """Metres per CRS unit of a georeferenced raster, or ``None`` when the CRS or transform is
    missing or the CRS is not projected (no linear unit)."""
    if crs is None or transform is None or not crs.is_projected:
        return None
    factor = crs.linear_units_factor[1] if crs.linear_units_factor else None
    return factor or None


def pixel_size_m(crs, transform) -> float | None:
    """Mean pixel side in metres, or ``None`` without a projected CRS in metres."""
    factor = metres_per_unit(crs, transform)
    if factor is None:
        return None
    a, e = abs(transform.a), abs(transform.e)
    if a == 0 or e == 0:
        return None
    return (a * e) ** 0.5 * factor


class GsdPolicy:
    """Decides per raster the scale (input pixel size / target GSD) to predict at, ``None`` for
    none; each reason for not resampling is logged once per run."""

    def __init__(self, option: str | float, trained_gsd: float | None):
        self.option = option
        self.trained_gsd = trained_gsd
        self._said: set[str] = set()

    def _once(self, key: str, msg: str, *args) -> None:
        if key not in self._said:
            self._said.add(key)
            logger.warning(msg, *args)

    def scale_for(self, source) -> float | None:
        if self.option == "off":
            return None
        target = self.option if isinstance(self.option, float) else self.trained_gsd
        if target is None:
            self._once(
                "model",
                "--gsd auto: the model's training GSD is unknown (no INPUT.GSD_M in the config); "
                "rasters are predicted at their own pixel size",
            )
            return None
        px = pixel_size_m(getattr(source, "crs", None), getattr(source, "transform", None))
        if px is None:
            self._once(
                "grid",
                "--gsd: %s has no projected CRS in metres (geographic CRS or plain image); "
                "such inputs are predicted at their own pixel size",
                getattr(source, "path", "input"),
            )
            return None
        scale = px / target
        if not 1 / MAX_SCALE <= scale <= MAX_SCALE:
            raise ValueError(
                f"{getattr(source, 'path', 'input')}: pixel size {px:.3g} m is {scale:.3g} times "
                f"the GSD {target:.3g} m to predict at (at most {MAX_SCALE:g}x either way); "
                "use --gsd off or a GSD nearer the raster's"
            )
        tol = AUTO_TOLERANCE if self.option == "auto" else 0.01
        if abs(scale - 1.0) <= tol:
            return None
        logger.info(
            "%s: pixel size %.3g m, predicting at %.3g m (scale %.3g), results on the input grid",
            getattr(source, "path", "input"),
            px,
            target,
            scale,
        )
        return scale
