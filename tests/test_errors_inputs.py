"""Inputs that are what they seem (segclip_d2.raster.sources): truncated files of every format are
failed inputs, band meaning comes from colour tags, GDAL's own error text is in the message."""

import cv2
import numpy as np
import pytest

from segclip_d2.raster.sources import InputError, open_source


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


# ----------------------------------------------------- issue 20, item 6: rasters as they are meant
def _rgb_image(h=40, w=56):
    """A smooth colour image and the brightness-based class ids a fake model gives it."""
    return _image(h, w)


def _red_is_class_1(rgb, valid):
    """A fake model: class 1 where red > 127 (probabilities (2, h, w))."""
    p1 = (rgb[..., 0].astype(np.float32) > 127).astype(np.float32)
    return np.stack([1 - p1, p1])


def _predict(path, tmp_path, stem="p", cog=False):
    """Class ids of ``path`` through the demo's outputs (the fake model); the source too."""
    from segclip_d2.geo.outputs import OutputOptions, predict_to_outputs

    src = open_source(path)
    opts = OutputOptions(["dark", "red"], [(0, 0, 0), (255, 0, 0)], cog=cog, block_size=32)
    opts.margin = 8
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    try:
        names, _ = predict_to_outputs(src, _red_is_class_1, out, stem, opts)
    finally:
        src.close()
    return out / names[0]


def _read_ids(path):
    import rasterio

    if path.suffix == ".png":
        return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    with rasterio.open(path) as ds:
        return ds.read(1)


def _paletted(path):
    """A paletted GeoTIFF of 4 colours (indices 0..3; index 3 is the nodata value; TIFF colour
    tables hold no alpha)."""
    import rasterio

    colours = {0: (250, 20, 20, 255), 1: (20, 250, 20, 255), 2: (200, 200, 10, 255)}
    colours[3] = (0, 0, 0, 255)
    idx = np.zeros((40, 56), np.uint8)
    idx[:, 14:28], idx[:, 28:42], idx[:, 42:] = 1, 2, 3
    profile = dict(driver="GTiff", height=40, width=56, count=1, dtype="uint8")
    with rasterio.open(path, "w", photometric="palette", nodata=3, **profile) as ds:
        ds.write(idx, 1)
        ds.write_colormap(1, colours)
    lut = np.array([colours[i] for i in range(4)], np.uint8)
    return lut[idx][..., :3], idx != 3


def _gcps_only(path):
    """An RGB GeoTIFF referenced by four ground control points only (no transform)."""
    import rasterio
    from rasterio.control import GroundControlPoint

    rgb = _rgb_image()
    gcps = [
        GroundControlPoint(0, 0, 500000, 5000000),
        GroundControlPoint(0, 56, 500017, 5000000),
        GroundControlPoint(40, 0, 500000, 4999988),
        GroundControlPoint(40, 56, 500017, 4999988),
    ]
    profile = dict(driver="GTiff", height=40, width=56, count=3, dtype="uint8")
    with rasterio.open(path, "w", gcps=gcps, crs="EPSG:32633", **profile) as ds:
        ds.write(np.moveaxis(rgb, -1, 0))
    return rgb, gcps


def _exif_rotated(path, orientation=6):
    """A JPEG stored sideways with EXIF orientation ``orientation``; the image as displayed."""
    from PIL import Image, ImageOps

    stored = Image.fromarray(_rgb_image(40, 56))
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, quality=95, exif=exif.tobytes())
    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def _jp2(path):
    """A JPEG 2000 file written by GDAL (the Sentinel-2 format), lossless."""
    import rasterio

    with rasterio.Env() as env:
        if "JP2OpenJPEG" not in env.drivers():
            pytest.skip("GDAL has no JP2OpenJPEG driver here")
    rgb = _rgb_image()
    profile = dict(driver="JP2OpenJPEG", height=40, width=56, count=3, dtype="uint8")
    with rasterio.open(path, "w", QUALITY=100, REVERSIBLE="YES", **profile) as ds:
        ds.write(np.moveaxis(rgb, -1, 0))
    return rgb


def test_paletted_geotiff_is_expanded_through_its_colour_table(tmp_path):
    rgb, valid = _paletted(tmp_path / "pal.tif")
    src = open_source(tmp_path / "pal.tif")
    got, got_valid = src.read(0, 0, 40, 56)
    src.close()
    np.testing.assert_array_equal(got, rgb)
    np.testing.assert_array_equal(got_valid, valid)
    ids = _read_ids(_predict(tmp_path / "pal.tif", tmp_path))
    expect = np.where(valid, (rgb[..., 0] > 127).astype(np.uint8), 255)
    np.testing.assert_array_equal(ids, expect)


@pytest.mark.parametrize("cog", [False, True])
def test_gcp_only_geotiff_keeps_its_gcps_and_crs(tmp_path, cog):
    import rasterio

    rgb, gcps = _gcps_only(tmp_path / "gcp.tif")
    out = _predict(tmp_path / "gcp.tif", tmp_path, cog=cog)
    with rasterio.open(out) as ds:
        got, crs = ds.gcps
        ids = ds.read(1)
    assert crs.to_epsg() == 32633
    assert [(g.row, g.col, g.x, g.y) for g in got] == [(g.row, g.col, g.x, g.y) for g in gcps]
    np.testing.assert_array_equal(ids, (rgb[..., 0] > 127).astype(np.uint8))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_jpeg_with_exif_orientation_is_predicted_as_displayed(tmp_path, orientation):
    displayed = _exif_rotated(tmp_path / "photo.jpg", orientation)
    src = open_source(tmp_path / "photo.jpg")
    assert (src.height, src.width) == displayed.shape[:2]
    got, _ = src.read(0, 0, src.height, src.width)
    assert np.abs(got.astype(int) - displayed.astype(int)).max() <= 2  # the same JPEG decode
    # the prediction is the displayed image's: compare with the same pixels saved plainly
    cv2.imwrite(str(tmp_path / "plain.png"), np.ascontiguousarray(got[:, :, ::-1]))
    ids = _read_ids(_predict(tmp_path / "photo.jpg", tmp_path, "photo"))
    np.testing.assert_array_equal(ids, _read_ids(_predict(tmp_path / "plain.png", tmp_path)))


def test_gdal_jpeg2000_is_read_by_gdal(tmp_path):
    rgb = _jp2(tmp_path / "s2.jp2")
    src = open_source(tmp_path / "s2.jp2")
    got, valid = src.read(0, 0, 40, 56)
    src.close()
    np.testing.assert_array_equal(got, rgb)
    assert valid.all()
    ids = _read_ids(_predict(tmp_path / "s2.jp2", tmp_path))
    np.testing.assert_array_equal(ids, (rgb[..., 0] > 127).astype(np.uint8))
