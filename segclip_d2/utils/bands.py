"""What values a model reads: the one rule shared by the model card, the raster sources and the
ONNX back-end (standard library only; every layer may import it)."""

from __future__ import annotations

from collections.abc import Sequence

RGB_NAMES = ("red", "green", "blue")
# ``input.values`` of a model card: what the bands held when the model was trained.
RGB_0_255 = "rgb_0_255"  # 8-bit RGB; other data types are stretched to 0..255 for it
AS_READ = "as_read"  # the band values as read from the file, unscaled


def input_values(bands: Sequence[str], pixel_mean: Sequence[float]) -> str:
    """:data:`RGB_0_255` for a model of the red, green and blue bands whose pixel means lie in
    0..255 (the RGB models); :data:`AS_READ` for any other (N bands, or statistics of 16-bit or
    float data): such a model normalises the values itself, so they are never stretched."""
    names = [str(b).strip().lower() for b in bands]
    if names == list(RGB_NAMES) and all(0.0 <= float(m) <= 255.0 for m in pixel_mean):
        return RGB_0_255
    return AS_READ


def check_band_names(bands: Sequence[str], where: str) -> list[str]:
    """``bands`` as a list of distinct non-empty lower-case names, else ``ValueError``."""
    names = [str(b).strip().lower() for b in bands]
    if not names or any(not n for n in names) or len(set(names)) != len(names):
        raise ValueError(f"{where}: band names must be distinct and non-empty, got {list(bands)}")
    return names
