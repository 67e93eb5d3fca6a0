"""More bands than RGB: the widened CLIP stem, the pixel statistics check, synthetic NIR."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from segclip_d2.checkpoint.widen import MAX_NEW_BAND_GAIN
from segclip_d2.data.bands import display_rgb, rgb_indices
from segclip_d2.modeling.backbone.clip_resnet import CLIPResNetBackbone, widen_first_conv


@pytest.fixture(scope="module")
def rgb_backbone():
    torch.manual_seed(0)
    return CLIPResNetBackbone("RN50", pretrained="", out_features=["res2", "res3"]).eval()


@pytest.mark.parametrize(
    "bands", [["red", "green", "blue", "nir"], ["nir", "blue", "swir", "red", "green"]]
)
def test_widened_stem_equals_rgb_model_when_extra_bands_are_zero(rgb_backbone, bands):
    wide = CLIPResNetBackbone("RN50", pretrained="", out_features=["res2", "res3"], bands=bands)
    wide.eval()
    assert wide.stem.conv1.in_channels == len(bands)
    rgb = torch.randn(2, 3, 64, 64)
    x = torch.zeros(2, len(bands), 64, 64)
    for c, name in enumerate(("red", "green", "blue")):
        x[:, bands.index(name)] = rgb[:, c]
    with torch.no_grad():
        want, got = rgb_backbone(rgb), wide(x)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4)
    # an extra band that carries signal changes the output (it is wired in)
    x[:, bands.index("nir")] = 1.0
    with torch.no_grad():
        assert not torch.allclose(wide(x)["res2"], want["res2"], atol=1e-3)
    with pytest.raises(ValueError, match=f"takes \\(B, {len(bands)}, H, W\\)"):
        wide(rgb)


def _conv_with(kernels: list[torch.Tensor]) -> nn.Conv2d:
    conv = nn.Conv2d(3, kernels[0].shape[0], 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.stack(kernels, dim=1))
    return conv


def test_new_band_kernel_rule_keeps_a_visible_bands_activation_size():
    """Kernels a + d, a, a - d (a shared part, d colour-opponent): the mean is a, which responds
    less than a visible kernel; the new band's kernel is scaled back to the visible size."""
    torch.manual_seed(1)
    a, d = torch.randn(8, 3, 3), 0.8 * torch.randn(8, 3, 3)
    conv = _conv_with([a + d, a, a - d])
    wide = widen_first_conv(conv, ["red", "green", "blue", "nir"])
    new = wide.weight[:, 3]
    visible_sq = conv.weight.pow(2).sum(dim=(2, 3)).mean(dim=1)  # (O,) mean_c |W_c|^2
    expected = torch.minimum(visible_sq, MAX_NEW_BAND_GAIN**2 * a.pow(2).sum(dim=(1, 2)))
    torch.testing.assert_close(new.pow(2).sum(dim=(1, 2)), expected)
    torch.testing.assert_close(
        new / new.norm(dim=(1, 2), keepdim=True), a / a.norm(dim=(1, 2), keepdim=True)
    )
    # measured: white unit-variance noise on the new band alone vs on one visible band alone
    noise = torch.randn(1, 1, 256, 256)
    with torch.no_grad():
        rms = []
        for band in range(4):
            x = torch.zeros(1, 4, 256, 256)
            x[:, band] = noise[:, 0]
            rms.append(wide(x).pow(2).mean(dim=(0, 2, 3)))  # (O,)
    visible = torch.stack(rms[:3]).mean(0)
    uncapped = visible_sq < MAX_NEW_BAND_GAIN**2 * a.pow(2).sum(dim=(1, 2))
    assert uncapped.sum() >= 4
    ratio = rms[3][uncapped] / visible[uncapped]
    assert ((ratio > 0.9) & (ratio < 1.1)).all(), ratio


def test_new_band_gain_is_capped_for_cancelling_kernels():
    torch.manual_seed(2)
    a, d = 0.01 * torch.randn(4, 3, 3), torch.randn(4, 3, 3)
    wide = widen_first_conv(_conv_with([a + d, a, a - d]), ["nir", "red", "green", "blue"])
    torch.testing.assert_close(wide.weight[:, 0], MAX_NEW_BAND_GAIN * a)
    torch.testing.assert_close(wide.weight[:, 1:], torch.stack([a + d, a, a - d], dim=1))


def test_pixel_statistics_must_match_the_bands():
    from detectron2.config import get_cfg

    from segclip_d2 import add_segclip_config
    from segclip_d2.modeling.meta_arch import SegCLIP

    cfg = get_cfg()
    add_segclip_config(cfg)
    cfg.DATASETS.TRAIN = ("synthetic_aerial_nir_train",)
    cfg.INPUT.BANDS = ["red", "green", "blue", "nir"]
    cfg.INPUT.FORMAT = "RGB"
    with pytest.raises(ValueError, match="INPUT.BANDS names 4 input channels"):
        SegCLIP.from_config(cfg)  # PIXEL_MEAN/STD still have the 3 RGB values


def test_band_helpers():
    assert rgb_indices(["nir", "Blue", "green", "red"]) == (3, 2, 1)
    assert rgb_indices(["vv", "vh"]) is None
    img = np.arange(2 * 2 * 4, dtype=np.uint16).reshape(2, 2, 4) * 1000
    shown = display_rgb(img, ["nir", "red", "green", "blue"])
    assert shown.dtype == np.uint8 and shown.shape == (2, 2, 3)
    assert shown[..., 0].max() == 255 and shown[..., 0].min() == 0  # stretched per band
    u8 = np.random.default_rng(0).integers(0, 255, (3, 3, 4)).astype(np.uint8)
    np.testing.assert_array_equal(display_rgb(u8, ["blue", "green", "red", "nir"]), u8[..., 2::-1])


# --------------------------------------------------------------------------- synthetic NIR
def test_synthetic_nir_band_behaves_like_nir():
    from segclip_d2.data.synthetic import FACTS, generate_tile, tile_scene, tile_seed

    values = {}
    for i in range(4):
        rgb, label = generate_tile(tile_seed(0, "train", i), 256, tile_scene(i))
        img, label4 = generate_tile(tile_seed(0, "train", i), 256, tile_scene(i), nir=True)
        np.testing.assert_array_equal(img[..., :3], rgb)  # same visible bands and labels
        np.testing.assert_array_equal(label4, label)
        for k, name in enumerate(FACTS.classes):
            values.setdefault(name, []).append(img[..., 3][label == k])
        assert (img[..., 3][label == 255] == 0).all()
    nir = {k: float(np.concatenate(v).mean()) for k, v in values.items()}
    # vegetation bright, water dark, soil, roads and roofs moderate
    assert nir["forest"] > 150 and nir["water"] < 40, nir
    assert nir["forest"] > nir["agriculture"] > nir["barren"], nir
    for moderate in ("building", "road", "barren"):
        assert 50 < nir[moderate] < nir["forest"] - 40, (moderate, nir)


def test_synthetic_rgb_set_is_unchanged_by_the_nir_option(tmp_path):
    import json

    from segclip_d2.data.synthetic import ensure_synthetic_aerial

    rgb = ensure_synthetic_aerial(tmp_path, num_train=1, num_val=1, size=64, seed=3)
    nir = ensure_synthetic_aerial(tmp_path, num_train=1, num_val=1, size=64, seed=3, nir=True)
    assert rgb.name == "synthetic_aerial" and nir.name == "synthetic_aerial_nir"
    params = json.loads((rgb / "meta.json").read_text())["params"]
    assert params == {"num_train": 1, "num_val": 1, "size": 64, "seed": 3, "version": 2}
    assert sorted(p.name for p in (rgb / "train/images").iterdir()) == ["train_0000.png"]
    assert sorted(p.name for p in (nir / "train/images").iterdir()) == ["train_0000.tif"]
    import cv2

    from segclip_d2.data.bands import read_tiff_bands

    four = read_tiff_bands(nir / "train/images/train_0000.tif")
    three = cv2.imread(str(rgb / "train/images/train_0000.png"))[..., ::-1]
    assert four.shape == (64, 64, 4) and four.dtype == np.uint8
    np.testing.assert_array_equal(four[..., :3], three)


def _resnet_cfg(tiny_config, folder, bands, mean, std):
    from segclip_d2.config import load_config

    nir = len(bands) == 4
    opts = [
        "MODEL.BACKBONE.NAME", "build_resnet_backbone", "MODEL.RESNETS.DEPTH", "18",
        "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.RESNETS.NORM", "BN",
        "MODEL.RESNETS.OUT_FEATURES", "['res2', 'res3', 'res4', 'res5']",
        "MODEL.WEIGHTS", "", "INPUT.BANDS", str(bands),
        "MODEL.PIXEL_MEAN", str(mean), "MODEL.PIXEL_STD", str(std),
        "DATASETS.TRAIN", f"('synthetic_aerial{'_nir' if nir else ''}_train',)",
        "DATASETS.TEST", f"('synthetic_aerial{'_nir' if nir else ''}_val',)",
    ]  # fmt: skip
    return load_config(str(tiny_config(folder)), opts)


def test_training_widens_an_imagenet_pkl_backbone_to_the_model_bands(tmp_path, tiny_config):
    """A detectron2 ``.pkl`` (RGB ImageNet ResNet, keys without ``backbone.``) given as
    MODEL.WEIGHTS to an RGB+NIR model: the stem keeps the R, G, B kernels and the NIR kernel is
    the scaled mean; every other backbone weight loads as is (nothing left random)."""
    import pickle

    from detectron2.modeling import build_model

    from segclip_d2.checkpoint.widen import widen_rgb_kernels
    from segclip_d2.engine.checkpointer import TrainingCheckpointer

    torch.manual_seed(0)
    rgb = ["red", "green", "blue"]
    rgb_cfg = _resnet_cfg(tiny_config, tmp_path, rgb, [123.7, 116.3, 103.5], [58.4, 57.1, 57.4])
    rgb_model = build_model(rgb_cfg)
    pkl = {
        k.removeprefix("backbone."): v.numpy().copy()
        for k, v in rgb_model.state_dict().items()
        if k.startswith("backbone.")
    }
    path = tmp_path / "R-18.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": pkl, "__author__": "torchvision", "matching_heuristics": True}, f)

    bands = [*rgb, "nir"]
    nir_cfg = _resnet_cfg(tiny_config, tmp_path, bands, [123.7, 116.3, 103.5, 121.5], [58] * 4)
    torch.manual_seed(1)
    model = build_model(nir_cfg)
    assert model.input_bands == tuple(bands)
    ckpt = TrainingCheckpointer(model, str(tmp_path / "out"), card_fn=lambda extra: {})
    ckpt.load(str(path), checkpointables=[])
    stem = model.state_dict()["backbone.stem.conv1.weight"]
    assert stem.shape[1] == 4
    rgb_stem = torch.from_numpy(pkl["stem.conv1.weight"])
    torch.testing.assert_close(stem[:, :3], rgb_stem)
    torch.testing.assert_close(stem, widen_rgb_kernels(rgb_stem, bands))
    state = model.state_dict()
    for key in ("res2.0.conv1.weight", "res5.1.conv2.weight"):
        torch.testing.assert_close(state[f"backbone.{key}"], torch.from_numpy(pkl[key]))


def test_inference_loading_never_widens(tmp_path, tiny_config):
    """Evaluation and the demo refuse an RGB checkpoint for an N-band model: widening is a
    training start, not a way to run RGB weights on other bands."""
    from detectron2.modeling import build_model

    from segclip_d2.checkpoint.checkpointer import CheckpointMismatchError, InferenceCheckpointer

    rgb = ["red", "green", "blue"]
    rgb_model = build_model(
        _resnet_cfg(tiny_config, tmp_path, rgb, [123.7, 116.3, 103.5], [58.4, 57.1, 57.4])
    )
    path = tmp_path / "rgb.pth"
    torch.save({"model": rgb_model.state_dict()}, path)
    bands = [*rgb, "nir"]
    model = build_model(_resnet_cfg(tiny_config, tmp_path, bands, [120] * 4, [58] * 4))
    with pytest.raises(CheckpointMismatchError, match="stem.conv1"):
        InferenceCheckpointer(model).load(str(path))
