"""SegInferencer: sliding windows, TTA and precision, with dummy predict functions and the tiny
real model."""

import pytest
import torch

from segclip_d2.predict import (
    SegInferencer,
    SegmentorWithInference,
    build_views,
    window_boxes,
    window_starts,
)
from segclip_d2.predict.precision import effective_precision

K = 5


def pixelwise(images):
    """A position-independent per-pixel class-probability function: (B, 3, h, w) -> (B, K, h, w).

    Equivariant to any flip / rotation / crop, so every inference mode must reproduce it.
    """
    r, g, b = images[:, 0], images[:, 1], images[:, 2]
    logits = torch.stack([r / 50, g / 60, b / 70, (r - g) / 80, (g * b).sqrt() / 90], dim=1)
    return logits.softmax(dim=1)


def context_dependent(images):
    """Depends on the whole input (its mean) and on position: windows see different context."""
    b, _, h, w = images.shape
    ramp = torch.linspace(0, 1, w).view(1, 1, 1, w).expand(b, K, h, w)
    mean = images.mean(dim=(1, 2, 3)).view(b, 1, 1, 1)
    logits = ramp * torch.arange(K).view(1, K, 1, 1) + mean / 100
    return logits.softmax(dim=1)


def _image(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((3, h, w), generator=g) * 255


def test_window_starts_cover_and_stay_inside():
    assert window_starts(1024, 512, 341) == [0, 341, 512]
    assert window_starts(300, 512, 341) == [0]
    for size, crop, stride in [(1000, 256, 200), (257, 256, 1), (777, 100, 100)]:
        starts = window_starts(size, crop, stride)
        covered = torch.zeros(size, dtype=torch.bool)
        for s in starts:
            assert 0 <= s and s + crop <= size
            covered[s : s + crop] = True
        assert covered.all()
    with pytest.raises(ValueError, match="uncovered"):
        window_starts(100, 10, 20)


def test_windows_share_one_size_even_when_image_is_smaller_than_crop():
    boxes = window_boxes(100, 700, (512, 512), (341, 341))
    assert {(h, w) for _, _, h, w in boxes} == {(100, 512)}
    assert [x for _, x, _, _ in boxes] == [0, 188]


def test_slide_equals_whole_when_crop_covers_the_image():
    img = _image(70, 90)
    whole = SegInferencer(mode="whole")(context_dependent, img)
    for crop in [(70, 90), (128, 128), (512, 512)]:
        slide = SegInferencer(mode="slide", crop_size=crop, stride=crop)
        torch.testing.assert_close(slide(context_dependent, img), whole, rtol=0, atol=0)


def test_slide_differs_from_whole_when_windows_see_different_context():
    img = _image(64, 96)
    whole = SegInferencer(mode="whole")(context_dependent, img)
    slide = SegInferencer(mode="slide", crop_size=(32, 32), stride=(16, 16))(context_dependent, img)
    assert not torch.allclose(whole, slide, atol=1e-3)


@pytest.mark.parametrize(
    "crop,stride,batch",
    [
        ((32, 32), (16, 16), 1),
        ((40, 24), (17, 24), 3),
        ((64, 48), (5, 47), 8),
        ((33, 33), (1, 33), 64),
    ],
)
def test_slide_equals_whole_for_position_independent_predictor(crop, stride, batch):
    img = _image(77, 101, seed=1)
    whole = SegInferencer(mode="whole")(pixelwise, img)
    inf = SegInferencer(mode="slide", crop_size=crop, stride=stride, batch_size=batch)
    out = inf(pixelwise, img)
    assert out.shape == (K, 77, 101) and out.dtype == torch.float32
    torch.testing.assert_close(out, whole, rtol=0, atol=1e-6)
    # The batches really were batched.
    n_windows = len(window_boxes(77, 101, crop, stride))
    assert inf.num_predict_calls == -(-n_windows // batch)


def test_each_call_gets_the_image_unpadded():
    """The model pads to its size divisibility itself: the inferencer pads nothing (once only)."""
    seen = []

    def spy(images):
        seen.append(images.clone())
        return pixelwise(images)

    img = _image(50, 70)
    out = SegInferencer(mode="whole")(spy, img)
    assert seen[0].shape == (1, 3, 50, 70) and torch.equal(seen[0][0], img)
    assert out.shape == (K, 50, 70)


def test_wrong_predict_fn_output_shape_is_reported():
    with pytest.raises(ValueError, match="predict_fn returned shape"):
        SegInferencer()(lambda x: x[:, :, ::2], _image(32, 32))


def test_tta_with_identity_only_views_equals_plain_inference():
    img = _image(48, 80)
    plain = SegInferencer(mode="whole")(context_dependent, img)
    tta = SegInferencer(
        mode="whole", tta_enabled=True, tta_flips=(), tta_rotations=(0, 360), tta_scales=(1.0,)
    )
    assert len(tta.views) == 1
    torch.testing.assert_close(tta(context_dependent, img), plain, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_tta_flips_and_rotations_of_equivariant_predictor_equal_plain(mode):
    img = _image(40, 72, seed=2)
    kw = dict(mode=mode, crop_size=(32, 48), stride=(16, 24))
    plain = SegInferencer(**kw)(pixelwise, img)
    tta = SegInferencer(**kw, tta_enabled=True, tta_flips=("h", "v"), tta_rotations=(90, 180, 270))
    assert len(tta.views) == 6
    torch.testing.assert_close(tta(pixelwise, img), plain, rtol=0, atol=1e-6)


def test_tta_views_map_back_exactly():
    """A position-revealing predictor: each view's output mapped back must be the plain output."""

    def coords(images):
        b, _, h, w = images.shape
        return images[:, :2]  # first two channels, mapped back they must be the input's

    img = _image(30, 50, seed=3)
    for view in build_views(("h", "v"), (90, 180, 270), (1.0,)):
        back = view.invert(coords(view.apply(img)[None])[0], (30, 50))
        assert torch.equal(back, img[:2]), view


def test_tta_scales_average_views_at_original_size():
    calls = []

    def spy(images):
        calls.append(tuple(images.shape[-2:]))
        return pixelwise(images)

    img = _image(64, 64)
    inf = SegInferencer(tta_enabled=True, tta_flips=("h",), tta_rotations=(), tta_scales=(0.5, 1.5))
    out = inf(spy, img)
    assert out.shape == (K, 64, 64)
    assert sorted(set(calls)) == [(32, 32), (64, 64), (96, 96)]
    assert len(calls) == 6
    torch.testing.assert_close(out.sum(0), torch.ones(64, 64), atol=1e-5, rtol=0)
    # Smooth inputs give nearly the same probabilities at every scale.
    ramp = torch.linspace(0, 255, 64)
    smooth = torch.stack(
        [
            ramp.view(64, 1).expand(64, 64),
            ramp.view(1, 64).expand(64, 64),
            torch.full((64, 64), 100.0),
        ]
    )
    torch.testing.assert_close(
        inf(pixelwise, smooth), SegInferencer()(pixelwise, smooth), atol=0.02, rtol=0
    )


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="TEST.MODE"):
        SegInferencer(mode="tiles")
    with pytest.raises(ValueError, match="STRIDE"):
        SegInferencer(mode="slide", crop_size=(64, 64), stride=(65, 10))
    with pytest.raises(ValueError, match="precision"):
        SegInferencer(precision="int8")
    with pytest.raises(ValueError, match="multiple of 90"):
        SegInferencer(tta_enabled=True, tta_rotations=(45,))


def test_bf16_autocast_is_active_inside_predict_fn_and_output_is_fp32():
    seen = {}

    def spy(images):
        w = torch.ones(3, K)
        seen["dtype"] = torch.einsum("bchw,ck->bkhw", images, w).dtype
        seen["autocast"] = torch.is_autocast_enabled("cpu")
        return pixelwise(images)

    out = SegInferencer(precision="bf16")(spy, _image(32, 32))
    assert seen["autocast"] and out.dtype == torch.float32
    SegInferencer(precision="fp32")(spy, _image(32, 32))
    assert not seen["autocast"]


def test_fp16_on_cpu_falls_back_to_bf16():
    assert effective_precision("fp16", "cpu") == "bf16"
    assert effective_precision("fp16", "cuda") == "fp16"
    assert effective_precision("BF16", "cpu") == "bf16"


def test_from_config_reads_test_keys():
    from detectron2.config import get_cfg

    from segclip_d2 import add_segclip_config

    cfg = get_cfg()
    add_segclip_config(cfg)
    cfg.TEST.MODE = "slide"
    cfg.TEST.SLIDE.CROP_SIZE = (256, 128)
    cfg.TEST.SLIDE.STRIDE = (200, 100)
    cfg.TEST.SLIDE.BATCH_SIZE = 2
    cfg.TEST.TTA.ENABLED = True
    cfg.TEST.TTA.FLIPS = ["h"]
    cfg.TEST.TTA.ROTATIONS = []
    cfg.TEST.TTA.SCALES = [0.75]
    cfg.TEST.PRECISION = "bf16"
    inf = SegInferencer(cfg)
    assert (inf.mode, inf.crop_size, inf.stride, inf.batch_size) == (
        "slide",
        (256, 128),
        (200, 100),
        2,
    )
    assert len(inf.views) == 4 and inf.precision == "bf16"


def test_tiny_segclip_eval_is_one_whole_image_pass_and_the_wrapper_runs_the_modes(
    tmp_path, tiny_config
):
    """The real (tiny, random) model: its eval forward is one whole-image pass; the model wrapped
    with SegmentorWithInference gives the same result in whole mode, and sliding windows whose
    crop covers the image reproduce it."""
    from detectron2.modeling import build_model

    import segclip_d2.modeling  # noqa: F401
    import segclip_d2.modeling.backbone  # noqa: F401
    import segclip_d2.modeling.meta_arch  # noqa: F401
    from segclip_d2.config import load_config

    cfg_file = tiny_config(tmp_path, "linear")
    cfg = load_config(str(cfg_file))
    cfg.TEST.PRECISION = "fp32"  # compared with the model's own fp32 pass
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert not hasattr(model, "inferencer")  # the model does not know how it is run
    image = (torch.rand(3, 40, 72) * 255).to(torch.uint8)
    with torch.no_grad():
        (out,) = model([{"image": image, "height": 40, "width": 72}])
        wrapped = SegmentorWithInference(model, SegInferencer(cfg))
        (out_wrapped,) = wrapped([{"image": image, "height": 40, "width": 72}])
    assert wrapped.inferencer.num_predict_calls == 1
    probs = out["sem_seg"]
    torch.testing.assert_close(out_wrapped["sem_seg"], probs, rtol=0, atol=1e-6)
    assert probs.shape == (7, 40, 72) and torch.isfinite(probs).all()
    cfg.defrost()
    cfg.TEST.MODE = "slide"
    cfg.TEST.SLIDE.CROP_SIZE = (64, 96)
    cfg.TEST.SLIDE.STRIDE = (32, 32)
    slide = SegInferencer(cfg)
    torch.testing.assert_close(
        slide(model.predict_sem_seg_probs, image.float()), probs, rtol=0, atol=1e-6
    )
    # Windows smaller than the image: finite, same shape, several batched calls.
    cfg.TEST.SLIDE.CROP_SIZE = (32, 32)
    cfg.TEST.SLIDE.STRIDE = (16, 32)
    cfg.TEST.SLIDE.BATCH_SIZE = 2
    slide = SegInferencer(cfg)
    windows = slide(model.predict_sem_seg_probs, image.float())
    assert windows.shape == probs.shape and torch.isfinite(windows).all()
    assert slide.num_predict_calls == 3  # 2 x 3 windows, 2 per batch
