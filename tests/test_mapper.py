"""The aerial_semantic dataset mapper: output contract, alignment under augmentation, checks."""

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from PIL import Image

from segclip_d2.config import add_segclip_config
from segclip_d2.data.mapper import (
    MAPPER_REGISTRY,
    RandomCropCategoryLimit,
    Rot90Transform,
    build_test_mapper,
    build_train_mapper,
)

K = 7  # synthetic_aerial (LoveDA classes)


def _cfg(**overrides):
    cfg = add_segclip_config(get_cfg())
    cfg.INPUT.FORMAT = "RGB"
    cfg.DATASETS.TRAIN = ("synthetic_aerial_train",)
    cfg.DATASETS.TEST = ("synthetic_aerial_val",)
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute"
    cfg.INPUT.CROP.SIZE = (48, 40)
    cfg.INPUT.RESIZE_SCALE = (0.5, 2.0)
    cfg.INPUT.COLOR_AUG = False
    for k, v in overrides.items():
        node, key = cfg, k.split(".")
        for part in key[:-1]:
            node = node[part]
        node[key[-1]] = v
    return cfg


def _write(tmp_path, image, label, name="a"):
    ip, lp = tmp_path / f"{name}.png", tmp_path / f"{name}_l.png"
    Image.fromarray(image).save(ip)
    Image.fromarray(label).save(lp)
    return {"file_name": str(ip), "sem_seg_file_name": str(lp), "image_id": name}


def test_registry_and_output_contract(tmp_path):
    assert "aerial_semantic" in MAPPER_REGISTRY
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (50, 60, 3), dtype=np.uint8)
    lbl = rng.integers(0, K, (50, 60)).astype(np.uint8)
    lbl[:5] = 255
    rec = _write(tmp_path, img, lbl)
    mapper = build_train_mapper(
        _cfg(**{"MODEL.SEGCLIP.SIZE_DIVISIBILITY": 32, "INPUT.COLOR_AUG": True})
    )
    for _ in range(5):
        out = mapper(rec)
        im, seg = out["image"], out["sem_seg"]
        assert im.dtype == torch.uint8 and im.shape == (3, 64, 64)  # 48x40 crop padded to /32
        assert seg.dtype == torch.int64 and seg.shape == (64, 64)
        assert (out["height"], out["width"], out["file_name"]) == (50, 60, rec["file_name"])
        present = sorted(set(seg.unique().tolist()) - {255})
        assert out["gt_classes"].tolist() == present and out["gt_classes"].dtype == torch.int64
        assert out["gt_masks"].dtype == torch.bool
        assert out["gt_masks"].shape == (len(present), 64, 64)
        for c, m in zip(out["gt_classes"], out["gt_masks"]):
            assert torch.equal(m, seg == c)
        assert (seg[48:] == 255).all() and (im[:, 48:] == 0).all()  # divisibility padding
    with pytest.raises(KeyError):
        MAPPER_REGISTRY.get("no_such_mapper")


@pytest.mark.parametrize("scale", [(1.0, 1.0), (0.5, 2.0)])
def test_image_and_label_stay_aligned(tmp_path, scale):
    """label = f(image) before augmentation must hold after it, except where padded."""
    rng = np.random.default_rng(1)
    if scale == (1.0, 1.0):
        # every pixel random: any shift between image and label breaks f
        red = rng.integers(0, 256, (37, 45)).astype(np.uint8)
    else:
        # 12x12 blocks, one red value per class, so bilinear resizing keeps label-uniform
        # areas exact
        cls = rng.integers(0, K, (4, 5))
        red = np.kron(cls * 36 + 10, np.ones((12, 12))).astype(np.uint8)[:45, :57]
    img = np.stack([red, rng.integers(0, 256, red.shape, dtype=np.uint8), 255 - red], -1)

    def f(r):  # the label as a function of the red channel
        r = r.astype(np.int64)
        return r % K if scale == (1.0, 1.0) else (r - 10) // 36

    lbl = f(red).astype(np.uint8)
    rec = _write(tmp_path, img, lbl)
    # no divisibility padding: only the padding of crops larger than the image
    opts = {"INPUT.RESIZE_SCALE": scale, "INPUT.CROP.SIZE": (40, 52)}
    mapper = build_train_mapper(_cfg(**opts, **{"MODEL.SEGCLIP.SIZE_DIVISIBILITY": -1}))
    saw_padding = checked = total = 0
    for _ in range(30):
        out = mapper(rec)
        im = out["image"].numpy().transpose(1, 2, 0)  # (H, W, 3)
        seg = out["sem_seg"].numpy()
        pad = seg == 255
        saw_padding += pad.any()
        assert (im[pad] == 0).all()
        ok = ~pad
        if scale != (1.0, 1.0):  # compare only where the 5x5 label neighbourhood is uniform
            from scipy.ndimage import maximum_filter, minimum_filter

            ok &= maximum_filter(seg, 5) == minimum_filter(seg, 5)
            # the crop may cut through a block boundary the filter cannot see
            ok[:2] = ok[-2:] = ok[:, :2] = ok[:, -2:] = False
        np.testing.assert_array_equal(seg[ok], f(im[..., 0][ok]))
        assert (im[..., 2][ok] == 255 - im[..., 0][ok]).all()  # channels not mixed up
        checked += ok.sum()
        total += ok.size
    assert saw_padding  # crops larger than the (downscaled) image were padded
    assert checked > 0.25 * total  # the comparison covered a large part of the crops


def test_rot90_transform_matches_coordinates():
    img = np.arange(3 * 5).reshape(3, 5)
    for k in range(4):
        t = Rot90Transform(k, 3, 5)
        out = t.apply_image(img)
        np.testing.assert_array_equal(out, np.rot90(img, k))
        # pixel centre (x + .5, y + .5) of value v lands on the centre of v in the output
        for y, x in [(0, 0), (2, 4), (1, 3)]:
            ((nx, ny),) = t.apply_coords(np.array([[x + 0.5, y + 0.5]]))
            assert out[int(ny), int(nx)] == img[y, x]
        np.testing.assert_array_equal(t.inverse().apply_image(out), img)


def test_crop_category_limit_prefers_mixed_crops():
    seg = np.zeros((100, 100), np.uint8)
    seg[:30, :30] = 1
    seg[60:, 60:] = 255  # ignore does not count
    img = np.zeros((100, 100, 3), np.uint8)

    def mixed_fraction(limit):
        np.random.seed(0)
        aug = RandomCropCategoryLimit(40, 40, limit, 255)
        n = 0
        for _ in range(200):
            t = aug.get_transform(img, seg)
            win = seg[t.y0 : t.y0 + 40, t.x0 : t.x0 + 40]
            cnt = np.bincount(win.ravel(), minlength=256)[:2]
            n += cnt.max() < 0.9 * cnt.sum()
        return n / 200

    assert mixed_fraction(0.9) > mixed_fraction(1.0) + 0.2


def test_test_mapper_keeps_size_and_no_augmentation(tmp_path):
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (33, 47, 3), dtype=np.uint8)
    lbl = rng.integers(0, K, (33, 47)).astype(np.uint8)
    rec = _write(tmp_path, img, lbl)
    out = build_test_mapper(_cfg(**{"MODEL.SEGCLIP.SIZE_DIVISIBILITY": 32}))(rec)
    np.testing.assert_array_equal(out["image"].numpy().transpose(1, 2, 0), img)
    np.testing.assert_array_equal(out["sem_seg"].numpy(), lbl)
    assert "gt_masks" not in out
    unl = build_test_mapper(_cfg())({"file_name": rec["file_name"]})
    assert "sem_seg" not in unl and unl["image"].shape == (3, 33, 47)


def test_bad_labels_give_clear_errors(tmp_path):
    img = np.zeros((20, 30, 3), np.uint8)
    mapper = build_train_mapper(_cfg())
    rec = _write(tmp_path, img, np.zeros((20, 31), np.uint8), "size")
    with pytest.raises(ValueError, match=r"size_l\.png is 31x20 .*size\.png is 30x20"):
        mapper(rec)
    rec = _write(tmp_path, img, np.full((20, 30), 9, np.uint8), "vals")
    with pytest.raises(ValueError, match=r"vals_l\.png: label values \[9\] outside 0\.\.6"):
        mapper(rec)
    rec = _write(tmp_path, img, np.zeros((20, 30, 3), np.uint8), "rgb")
    with pytest.raises(ValueError, match=r"rgb_l\.png: labels must be single-channel"):
        mapper(rec)
    with pytest.raises(ValueError, match="INPUT.FORMAT"):
        build_train_mapper(_cfg(**{"INPUT.FORMAT": "BGR"}))


# --------------------------------------------------------------------------- N bands
def _write_tif(path, array):
    """(H, W, C) -> C-band TIFF (no georeference)."""
    import warnings

    import rasterio

    h, w, c = array.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(
            path, "w", driver="GTiff", width=w, height=h, count=c, dtype=array.dtype.name
        ) as dst:
            dst.write(array.transpose(2, 0, 1))
    return str(path)


NIR = ["red", "green", "blue", "nir"]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_mapper_reads_every_band_of_a_tiff(tmp_path, dtype):
    pytest.importorskip("rasterio")
    rng = np.random.default_rng(0)
    img = (rng.random((50, 60, 4)) * (200 if dtype == np.uint8 else 4000)).astype(dtype)
    lbl = rng.integers(0, K, (50, 60)).astype(np.uint8)
    Image.fromarray(lbl).save(tmp_path / "l.png")
    rec = {
        "file_name": _write_tif(tmp_path / "a.tif", img),
        "sem_seg_file_name": str(tmp_path / "l.png"),
    }
    cfg = _cfg(
        **{"INPUT.BANDS": NIR, "INPUT.COLOR_AUG": True, "MODEL.SEGCLIP.SIZE_DIVISIBILITY": 32}
    )
    out = build_test_mapper(cfg)(dict(rec))
    want = torch.uint8 if dtype == np.uint8 else torch.float32
    assert out["image"].dtype == want and out["image"].shape == (4, 50, 60)
    np.testing.assert_array_equal(
        out["image"].numpy(), img.transpose(2, 0, 1).astype(out["image"].numpy().dtype)
    )
    train = build_train_mapper(cfg)(dict(rec))
    assert train["image"].shape == (4, 64, 64) and train["image"].dtype == want
    with pytest.raises(ValueError, match="4 bands, but INPUT.BANDS names 3"):
        build_test_mapper(_cfg())(dict(rec))


def test_resize_keeps_each_band_like_the_rgb_path():
    """A 4-band uint8 image resizes band by band exactly as its RGB part does (PIL would take
    the fourth band as alpha and premultiply by it)."""
    from detectron2.data.transforms import ResizeTransform

    from segclip_d2.data.mapper import BandwiseResizeTransform

    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (40, 30, 4), dtype=np.uint8)
    img[:10, :, 3] = 0  # a zero "alpha" must not blank the visible bands
    t = BandwiseResizeTransform(40, 30, 57, 45, Image.BILINEAR)
    out = t.apply_image(img)
    rgb = ResizeTransform(40, 30, 57, 45, Image.BILINEAR).apply_image(img[..., :3].copy())
    assert out.shape == (57, 45, 4)
    np.testing.assert_array_equal(out[..., :3], rgb)
    single = ResizeTransform(40, 30, 57, 45, Image.BILINEAR).apply_image(img[..., 3:].copy())
    np.testing.assert_array_equal(out[..., 3], single[..., 0])


def test_photometric_jitter_on_visible_bands_and_brightness_contrast_elsewhere():
    from segclip_d2.data.mapper import PhotometricTransform

    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (20, 20, 4), dtype=np.uint8)
    nir_first = np.ascontiguousarray(img[..., [3, 0, 1, 2]])
    t3 = PhotometricTransform(10.0, 1.2, 1.3, 5.0)
    t4 = PhotometricTransform(10.0, 1.2, 1.3, 5.0, rgb=(1, 2, 3))
    out = t4.apply_image(nir_first)
    np.testing.assert_array_equal(out[..., 1:], t3.apply_image(np.ascontiguousarray(img[..., :3])))
    x = img[..., 3].astype(np.float32) + 10.0
    want = np.clip(np.rint((x - x.mean()) * 1.2 + x.mean()), 0, 255)
    np.testing.assert_array_equal(out[..., 0], want.astype(np.uint8))
    f = img.astype(np.float32) * 50
    outf = t4.apply_image(f)  # not uint8: gain and contrast on every band, no clipping
    g = f * (1 + 10.0 / 128)
    np.testing.assert_allclose(outf, (g - g.mean((0, 1))) * 1.2 + g.mean((0, 1)), rtol=1e-5)
