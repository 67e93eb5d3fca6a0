"""Remote-sensing outputs of the demo's engine: tapered window blending, polygons that survive
strip seams, ground-resolution resampling, probability / confidence rasters and COG layout."""

import numpy as np
import pytest
import torch
from affine import Affine
from rasterio.crs import CRS

from segclip_d2.geo.vectorize import _label_classes, polygonize, write_polygons
from segclip_d2.predict.slide import slide_inference, taper_1d, window_weight

UTM = CRS.from_epsg(32650)
TF = Affine(0.5, 0, 500000, 0, -0.5, 3400000)  # 0.5 m pixels


# ------------------------------------------------------------------ blending
def constant_per_window(images):
    """Each window predicts one class everywhere: class = window's mean brightness bucket."""
    b, _, h, w = images.shape
    k = 2
    out = torch.zeros((b, k, h, w))
    for i in range(b):
        out[i, int(images[i].mean() > 127)] = 1.0
    return out


def test_taper_is_smooth_rises_to_one_and_leaves_image_borders_flat():
    w = taper_1d(100, 40, "cosine", left=True, right=True)
    assert w[0] < 0.01 and w[-1] < 0.01 and np.all(w[40:60] == 1)
    assert np.all(w[1:41] >= w[:40])  # monotone up the ramp
    assert np.all(taper_1d(100, 40, "linear", left=False, right=True)[:60] == 1)
    assert np.all(taper_1d(100, 40, "flat", left=True, right=True) == 1)
    # A window on the image's left border keeps full weight there.
    ww = window_weight((0, 0, 64, 64), 64, 128, (0, 32), "cosine")
    assert np.all(ww[:, 0] == 1) and ww[0, -1] < 0.05
    with pytest.raises(ValueError, match="BLEND"):
        taper_1d(10, 4, "gaussian", True, True)


def test_tapered_overlap_follows_the_window_whose_centre_it_is_near():
    """Left half dark, right half bright: two windows of 96 over 128 columns disagree in the
    overlap 32..96. A flat mean gives 0.5 / 0.5 everywhere there; the taper hands each side of
    the overlap to the window it is nearer the centre of."""
    image = torch.zeros((3, 16, 128))
    image[:, :, 64:] = 255.0  # window 0 (cols 0..95) mean < 127, window 1 (32..127) > 127
    flat = slide_inference(constant_per_window, image, (16, 96), (16, 32), 2, "flat")
    cos = slide_inference(constant_per_window, image, (16, 96), (16, 32), 2, "cosine")
    assert torch.allclose(flat[1, :, 40], torch.tensor(0.5))
    assert cos[0, 0, 40] > 0.9 and cos[1, 0, 88] > 0.9  # near each window's own centre
    assert torch.allclose(cos.sum(0), torch.ones(16, 128))
    # Outside the overlap a single window decides, with any weight.
    assert torch.all(cos[0, :, :32] == 1) and torch.all(cos[1, :, 96:] == 1)


# ------------------------------------------------------------------ polygons
def blob_classes(h=150, w=130, k=4, seed=0):
    """Smooth random class regions with a no-data corner."""
    import cv2

    rng = np.random.default_rng(seed)
    noise = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), 6)
    edges = np.quantile(noise, np.linspace(0, 1, k + 1)[1:-1])
    ids = np.digitize(noise, edges).astype(np.uint8)
    ids[:20, :15] = 255
    return ids


def rasterise(geoms, values, shape, transform):
    from rasterio.features import rasterize

    return rasterize(
        zip(geoms, values), out_shape=shape, transform=transform, fill=255, dtype="uint8"
    )


def test_polygons_are_not_cut_at_strip_seams_and_rasterise_back_exactly():
    ids = blob_classes()
    feats = list(polygonize(*ids.shape, TF, lambda y, n: ids[y : y + n], strip_rows=7))
    # One feature per 4-connected region of the whole raster, whatever the strips.
    _, classes = _label_classes(ids)
    assert len(feats) == len(classes) - 1
    assert all(f[0].is_valid and f[0].geom_type == "Polygon" for f in feats)
    back = rasterise([f[0] for f in feats], [f[1] for f in feats], ids.shape, TF)
    np.testing.assert_array_equal(back, ids)
    assert sum(f[2] for f in feats) == int((ids != 255).sum())


@pytest.mark.parametrize("kind", ["gpkg", "geojson"])
def test_written_layer_has_attributes_crs_and_min_area(tmp_path, kind):
    import pyogrio

    ids = blob_classes()
    conf = np.full(ids.shape, 0.75, np.float32)
    names = ["a", "b", "c", "d"]
    path = tmp_path / f"x.{kind}"
    n = write_polygons(
        path,
        kind,
        *ids.shape,
        UTM,
        TF,
        names,
        lambda y, m: ids[y : y + m],
        lambda y, m: conf[y : y + m],
        strip_rows=9,
    )
    info = pyogrio.read_info(path)
    assert info["features"] == n and CRS.from_user_input(info["crs"]) == UTM
    meta, _, geoms, fields = pyogrio.raw.read(path)
    cols = dict(zip(meta["fields"], fields))
    assert set(cols) >= {"class_id", "class_name", "area_m2", "mean_confidence"}
    assert [names[c] for c in cols["class_id"]] == list(cols["class_name"])
    np.testing.assert_allclose(cols["mean_confidence"], 0.75, atol=1e-6)
    assert abs(cols["area_m2"].sum() - (ids != 255).sum() * 0.25) < 1e-6
    small = write_polygons(
        tmp_path / f"y.{kind}",
        kind,
        *ids.shape,
        UTM,
        TF,
        names,
        lambda y, m: ids[y : y + m],
        min_area=20.0,
    )
    assert 0 < small < n
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------ ground resolution
class Recorder:
    """A fake block probability function: probabilities from brightness; records the sizes it
    sees."""

    def __init__(self):
        self.shapes = []

    def __call__(self, rgb, valid):
        self.shapes.append(valid.shape)
        p1 = rgb[..., 0].astype(np.float32) / 255.0
        return np.stack([1 - p1, p1])


def test_gsd_policy_resamples_only_projected_rasters_off_by_more_than_ten_percent(caplog):
    from types import SimpleNamespace

    from segclip_d2.geo.gsd import GsdPolicy, parse_gsd

    def src(px, crs=UTM):
        return SimpleNamespace(crs=crs, transform=Affine(px, 0, 0, 0, -px, 0), path="r.tif")

    auto = GsdPolicy(parse_gsd("auto"), 0.3)
    assert auto.scale_for(src(0.15)) == pytest.approx(0.5)
    assert auto.scale_for(src(0.32)) is None  # within 10 %
    assert GsdPolicy("off", 0.3).scale_for(src(0.15)) is None
    assert GsdPolicy(parse_gsd("0.6"), None).scale_for(src(0.3)) == pytest.approx(0.5)
    with caplog.at_level("WARNING"):
        for _ in range(3):
            assert auto.scale_for(src(0.0001, CRS.from_epsg(4326))) is None
            assert GsdPolicy("auto", None).scale_for(src(0.15)) is None
    assert sum("no projected CRS" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(ValueError, match="--gsd"):
        parse_gsd("fine")


def write_raster(path, rgb, px=0.15, crs=UTM):
    import rasterio

    h, w, _ = rgb.shape
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=h,
        width=w,
        count=3,
        dtype="uint8",
        crs=crs,
        transform=Affine(px, 0, 500000, 0, -px, 3400000),
    ) as ds:
        ds.write(rgb.transpose(2, 0, 1))


def test_a_015m_raster_is_predicted_at_03m_and_returned_on_its_own_grid(tmp_path):
    import rasterio

    from segclip_d2.geo.outputs import OutputOptions, predict_to_outputs
    from segclip_d2.raster.sources import open_source

    rng = np.random.default_rng(0)
    rgb = np.repeat(rng.integers(0, 256, (90, 70, 1), dtype=np.uint8), 3, axis=2)
    rgb[:, :35] = 0  # left half class 0, right half mixed
    write_raster(tmp_path / "in.tif", rgb)
    rec = Recorder()
    opts = OutputOptions(["dark", "bright"], [(0, 0, 0), (255, 255, 255)], "float", cog=False)
    src = open_source(tmp_path / "in.tif")
    names, _ = predict_to_outputs(src, rec, tmp_path, "in", opts, scale=0.5)
    src.close()
    assert rec.shapes == [(45, 35)]  # half the pixels each way: 0.3 m
    with rasterio.open(tmp_path / "in_pred.tif") as c, rasterio.open(tmp_path / "in.tif") as i:
        assert (c.crs, c.transform, c.shape) == (i.crs, i.transform, i.shape)
        ids = c.read(1)
    with rasterio.open(tmp_path / "in_probs.tif") as p:
        assert p.shape == (90, 70) and p.count == 2
        probs = p.read()
    assert (ids[:, :30] == 0).all()
    np.testing.assert_array_equal(ids, probs.argmax(0))


# ------------------------------------------------------------------ rasters
def test_confidence_bands_are_top1_and_margin():
    from segclip_d2.raster.writers import confidence_bands

    p = np.array([[[0.2]], [[0.5]], [[0.3]]], np.float32)
    np.testing.assert_allclose(confidence_bands(p, (1, 1))[:, 0, 0], [0.5, 0.2], atol=1e-6)


# ------------------------------------------------------------------ block blending
class WindowContext:
    """A block probability function whose output depends on the whole block (its mean
    brightness), like a network's context: neighbouring blocks disagree in their overlap."""

    def __call__(self, rgb, valid):
        m = rgb.mean() / 255.0
        p1 = np.clip(rgb[..., 0].astype(np.float32) / 255.0 * 0.5 + m * 0.5, 0, 1)
        return np.stack([1 - p1, p1])


class ProbSink:
    def __init__(self, h, w):
        self.p = np.full((2, h, w), np.nan, np.float32)
        self.ids = np.zeros((h, w), np.uint8)
        self.calls = 0

    def add(self, y, x, ids, rgb, probs=None):
        h, w = ids.shape
        assert np.isnan(self.p[0, y : y + h, x : x + w]).all(), "pixel written twice"
        self.p[:, y : y + h, x : x + w] = probs
        self.ids[y : y + h, x : x + w] = ids
        self.calls += 1


def _ramp_source(h=100, w=90):
    from segclip_d2.raster.sources import ArraySource

    # A smooth left-to-right ramp: every block has another mean brightness.
    rgb = np.repeat(np.linspace(0, 255, w)[None, :, None], h, 0).repeat(3, 2).astype(np.uint8)
    src = ArraySource.__new__(ArraySource)
    src.rgb, src.valid, src.height, src.width = rgb, np.ones((h, w), bool), h, w
    return src


def _seam_step(blend):
    """Largest column-to-column change of class-1 probability at the block seams (x = 32, 64)
    and inside a block, for blocks of 32 with margin 8."""
    from segclip_d2.predict.blocks import predict_source

    sink = ProbSink(100, 90)
    predict_source(_ramp_source(), WindowContext(), [sink], block_size=32, margin=8, blend=blend)
    assert not np.isnan(sink.p).any(), "every pixel written exactly once"
    np.testing.assert_allclose(sink.p.sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(sink.ids, sink.p.argmax(0))
    step = np.abs(np.diff(sink.p[1, 40:56], axis=1))  # rows inside one block row
    return step[:, 20:44].max(), step[:, 4:12].max()


@pytest.mark.parametrize("blend", ["cosine", "linear"])
def test_block_blending_tapers_the_seams_that_cropping_leaves(blend):
    crop_seam, inside = _seam_step("crop")
    seam, _ = _seam_step(blend)
    assert crop_seam > 10 * inside  # cropped block centres: a hard step at the border
    assert seam < 0.2 * crop_seam  # tapered: the same change spread over the 16-px overlap


def test_block_blending_keeps_only_a_strip_of_pending_sums():
    from segclip_d2.predict import blocks as pipeline
    from segclip_d2.raster.sources import ArraySource

    src = ArraySource.__new__(ArraySource)
    h = w = 256
    src.rgb, src.valid, src.height, src.width = (
        np.zeros((h, w, 3), np.uint8),
        np.ones((h, w), bool),
        h,
        w,
    )
    seen = []
    orig = pipeline._BlendAccumulator.add

    def spy(self, *a):
        orig(self, *a)
        seen.append(len(self.sums))

    pipeline._BlendAccumulator.add = spy
    try:
        pipeline.predict_source(src, WindowContext(), [ProbSink(h, w)], block_size=32, margin=8)
    finally:
        pipeline._BlendAccumulator.add = orig
    cells_per_row = w // 8
    # Pending cells: the two cell rows of the seam below the current block row, plus one block.
    assert max(seen) <= 3 * cells_per_row + (32 + 16) // 8 * ((32 + 16) // 8)


@pytest.mark.parametrize("blend", ["crop", "flat", "cosine"])
def test_blocks_are_read_once_and_sinks_get_the_source_pixels(blend):
    """Each block window is read once (no second read for blended pixels), the sinks get the
    source's own pixels, and the class ids are the argmax of the probabilities they get."""
    from segclip_d2.predict.blocks import block_grid, predict_source

    src = _ramp_source(100, 90)
    src.rgb = np.random.default_rng(0).integers(0, 256, (100, 90, 3), dtype=np.uint8)
    reads = []
    read = src.read

    def counting_read(y, x, h, w):
        reads.append((y, x, h, w))
        return read(y, x, h, w)

    src.read = counting_read

    class RgbSink(ProbSink):
        def __init__(self, h, w):
            super().__init__(h, w)
            self.rgb = np.zeros((h, w, 3), np.uint8)

        def add(self, y, x, ids, rgb, probs=None):
            super().add(y, x, ids, rgb, probs)
            self.rgb[y : y + ids.shape[0], x : x + ids.shape[1]] = rgb

    sink = RgbSink(100, 90)
    predict_source(src, WindowContext(), [sink], block_size=32, margin=8, blend=blend)
    assert len(reads) == len(block_grid(100, 90, 32))
    np.testing.assert_array_equal(sink.rgb, src.rgb)
    np.testing.assert_array_equal(sink.ids, sink.p.argmax(0))
