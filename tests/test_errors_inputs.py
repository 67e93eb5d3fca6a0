"""Inputs that are what they seem (segclip_d2.raster.io): truncated files of every format are
failed inputs, band meaning comes from colour tags, GDAL's own error text is in the message."""

import cv2
import numpy as np
import pytest

from segclip_d2.raster.io import InputError, open_source


def _image(h=192, w=160, channels=3):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (h, w, channels)).astype(np.uint8)
    return cv2.GaussianBlur(img, (7, 7), 2)  # compressible, like a photo


def _encoded(ext: str) -> bytes:
    ok, buf = cv2.imencode(ext, _image())
    assert ok
    return buf.tobytes()


def _geotiff_bytes(tmp_path) -> bytes:
    import rasterio

    path = tmp_path / "whole.tif"
    profile = dict(driver="GTiff", height=512, width=512, count=3, dtype="uint8")
    with rasterio.open(path, "w", tiled=True, blockxsize=256, blockysize=256, **profile) as ds:
        ds.write(np.moveaxis(_image(512, 512), -1, 0))
    return path.read_bytes()


# (format, fraction of the file kept, text the message must contain)
TRUNCATED = [
    (".jpg", 0.5, "truncated"),
    (".jpg", 0.9, "truncated"),
    (".jpg", -2, "truncated"),  # only the end-of-image marker missing
    (".png", 0.5, "decoded"),
    (".png", 0.95, "decoded"),
    (".webp", 0.6, "decoded"),
    (".bmp", 0.7, "decoded"),
    (".tif", 0.5, "TIFFReadEncodedTile"),  # GDAL's own reason, not "See previous exception"
    (".tif", 0.9, "TIFFReadEncodedTile"),
]


@pytest.mark.parametrize("ext,keep,text", TRUNCATED)
def test_truncated_file_is_a_failed_input(tmp_path, ext, keep, text):
    data = _geotiff_bytes(tmp_path) if ext == ".tif" else _encoded(ext)
    cut = data[:keep] if keep < 0 else data[: int(len(data) * keep)]
    path = tmp_path / f"cut{ext}"
    path.write_bytes(cut)
    with pytest.raises(InputError) as info:
        src = open_source(path)
        try:
            src.read(0, 0, src.height, src.width)
        finally:
            src.close()
    msg = str(info.value)
    assert str(path) in msg and text in msg and "previous exception" not in msg


@pytest.mark.parametrize("ext", [".jpg", ".png", ".webp", ".bmp"])
def test_whole_files_still_read(tmp_path, ext):
    path = tmp_path / f"ok{ext}"
    path.write_bytes(_encoded(ext))
    src = open_source(path)
    rgb, valid = src.read(0, 0, src.height, src.width)
    assert rgb.shape == (192, 160, 3) and valid.all()


def _four_band(tmp_path, photometric, nir_first=False, alpha=False):
    """A 4-band uint8 GeoTIFF: bands R,G,B,NIR (or NIR,R,G,B) with NIR = 0 on the top half."""
    import rasterio

    rgb = np.moveaxis(_image(64, 48), -1, 0)
    nir = np.full((1, 64, 48), 200, np.uint8)
    nir[:, :32] = 0
    data = np.concatenate([nir, rgb]) if nir_first else np.concatenate([rgb, nir])
    path = tmp_path / f"four_{photometric}_{nir_first}_{alpha}.tif"
    kw = {"photometric": photometric}
    if alpha:
        kw["alpha"] = "YES"
    with rasterio.open(
        path, "w", driver="GTiff", height=64, width=48, count=4, dtype="uint8", **kw
    ) as ds:
        ds.write(data)
    return path, np.moveaxis(rgb, 0, -1)


# (photometric, NIR first, band 4 tagged alpha, --bands, expected: "refused" | "rgb" | "alpha")
FOUR_BAND = [
    ("MINISBLACK", True, False, None, "refused"),  # NIR,R,G,B untagged: never NIR as red
    ("MINISBLACK", False, False, None, "refused"),  # R,G,B,NIR untagged: never NIR as alpha
    ("MINISBLACK", True, False, (2, 3, 4), "rgb"),  # the way out the message names
    ("RGB", False, False, None, "rgb"),  # tagged R,G,B + undefined: band 4 is not alpha
    ("RGB", False, True, None, "alpha"),  # tagged RGBA: alpha 0 = no-data
]


@pytest.mark.parametrize("photometric,nir_first,alpha,bands,expect", FOUR_BAND)
def test_four_band_rasters_use_colour_tags(tmp_path, photometric, nir_first, alpha, bands, expect):
    path, rgb = _four_band(tmp_path, photometric, nir_first, alpha)
    if expect == "refused":
        with pytest.raises(InputError, match="--bands") as info:
            open_source(path, bands)
        assert str(path) in str(info.value)
        return
    src = open_source(path, bands)
    try:
        got, valid = src.read(0, 0, 64, 48)
    finally:
        src.close()
    np.testing.assert_array_equal(got, rgb)
    if expect == "alpha":
        assert not valid[:32].any() and valid[32:].all()
    else:
        assert valid.all(), "an untagged band must not become the no-data mask"


def test_png_alpha_channel_is_alpha(tmp_path):
    rgba = np.concatenate([_image(32, 32), np.full((32, 32, 1), 255, np.uint8)], axis=-1)
    rgba[:8, :, 3] = 0
    path = tmp_path / "rgba.png"
    cv2.imwrite(str(path), rgba)
    _, valid = open_source(path).read(0, 0, 32, 32)
    assert not valid[:8].any() and valid[8:].all()
