"""optimize_for_inference: every execution strategy gives the plain model's results (float
rounding), keeps the checkpoint layout, really applies, and never touches the training model."""

import copy
import math

import pytest
import torch
from test_model_segclip import _image, build  # tests/ is on sys.path (rootdir import mode)
from test_train import tiny_cfg, tiny_synthetic  # noqa: F401  (fixture)

import segclip_d2.predict.optimize as opt
from segclip_d2.modeling.transformer_decoder.attention_layers import CrossAttentionLayer
from segclip_d2.predict import onednn_linear
from segclip_d2.predict.frozen_bn_folding import Conv2dFoldedFrozenBN

SIZE = (61, 90)  # not divisible by 32: padding and cropping included


@pytest.fixture(scope="module")
def plain():
    model = build(seed=3, MSDA_IMPL="auto")
    with torch.no_grad():  # move the deformable attention and the heads away from their init
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


def _probs(model, precision):
    images = torch.stack([_image(*SIZE, seed=5).float(), _image(*SIZE, seed=6).float()])
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        return model.predict_sem_seg_probs(images)


# How many units of the precision's rounding (torch.finfo(dtype).eps, times the scores' scale) an
# optimised score may differ from the plain one. In fp32 the transforms reorder roundings all
# through the network (~5e-6 measured, 15 units); in bf16 the same activations are rounded to
# bf16 in both runs and only a few reordered roundings differ (~0.01 measured, under one unit;
# 0.039 with the former pixel refinement), on Zen 4 (native bf16) as with oneDNN/ATen held to
# AVX2.
ROUNDING_UNITS = {"fp32": 128, "bf16": 4}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def assert_same_scores(got, expected, precision):
    """``got`` is ``expected`` computed another way at ``precision``: every score within
    ROUNDING_UNITS[precision] units of that precision's rounding, the mean difference within an
    eighth of that, and the same class wherever the plain scores' top-2 margin exceeds twice
    the bound (near-ties may break either way)."""
    assert got.shape == expected.shape and got.dtype == expected.dtype == torch.float32
    scale = max(1.0, float(expected.abs().max()))
    bound = ROUNDING_UNITS[precision] * torch.finfo(DTYPES[precision]).eps * scale
    diff = (got - expected).abs()
    assert float(diff.max()) <= bound, f"max |difference| {float(diff.max()):.3g} > {bound:.3g}"
    assert float(diff.mean()) <= bound / 8, f"mean |difference| {float(diff.mean()):.3g}"
    top2 = expected.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * bound  # (B, h, w)
    assert clear.float().mean() > 0.5  # the check below has pixels to look at
    assert torch.equal(got.argmax(1)[clear], expected.argmax(1)[clear])


def _optimized(plain, precision, transforms):
    fast = opt.optimize_for_inference(copy.deepcopy(plain), "cpu", precision, transforms)
    assert fast.state_dict().keys() == plain.state_dict().keys()
    return fast


@pytest.fixture
def spies(monkeypatch):
    """Counts what the transforms do at run time."""
    seen = {"onednn": 0, "short_softmax": 0, "layouts": [], "attention_mask_sizes": []}
    real_linear, real_softmax, real_logits = (
        onednn_linear.linear,
        opt.short_row_softmax,
        opt.mask_logits,
    )

    def linear(x, w, b=None):
        seen["onednn"] += onednn_linear.uses_onednn(x, w)
        return real_linear(x, w, b)

    def softmax(x):
        seen["short_softmax"] += 1
        return real_softmax(x)

    def logits(embed, features):
        out = real_logits(embed, features)
        if features.shape[-2:] != (16, 24):  # not the stride-4 masks of the 61 x 90 (64 x 96) image
            seen["attention_mask_sizes"].append(tuple(out.shape[-2:]))
        return out

    monkeypatch.setattr(onednn_linear, "linear", linear)
    monkeypatch.setattr(opt, "short_row_softmax", softmax)
    monkeypatch.setattr(opt, "mask_logits", logits)
    return seen


@pytest.mark.parametrize(
    "transform,precision",
    [
        ("fold_frozen_bn", "fp32"),
        ("channels_last_input", "fp32"),
        ("cpu_kernels", "fp32"),
        ("cpu_kernels", "bf16"),
        ("chunked_encoder", "fp32"),
        ("chunked_encoder", "bf16"),
        ("decoder_masks", "fp32"),
        ("decoder_masks", "bf16"),
        ("cast_memory_once", "bf16"),
    ],
)
def test_each_transform_applies_and_equals_the_plain_model(
    plain, spies, monkeypatch, transform, precision
):
    monkeypatch.setattr(opt, "CHUNK_TOKENS", 7)  # uneven chunks, smaller than every level
    fast = _optimized(plain, precision, (transform,))
    assert opt.optimized_transforms(fast) == (transform,)
    fast.backbone.register_forward_pre_hook(
        lambda m, a: spies["layouts"].append(a[0].is_contiguous(memory_format=torch.channels_last))
    )
    got, expected = _probs(fast, precision), _probs(plain, precision)
    if transform == "cast_memory_once":  # autocast would cast the same tensors the same way
        torch.testing.assert_close(got, expected, rtol=0.0, atol=0.0)
    else:
        assert_same_scores(got, expected, precision)
    # ... and the transform really ran
    if transform == "fold_frozen_bn":
        assert any(isinstance(m, Conv2dFoldedFrozenBN) for m in fast.backbone.modules())
        assert not any(isinstance(m, Conv2dFoldedFrozenBN) for m in plain.backbone.modules())
    elif transform == "channels_last_input":
        assert spies["layouts"] and all(spies["layouts"])
    elif transform == "cpu_kernels":
        assert spies["short_softmax"] > 0
        assert (spies["onednn"] > 0) == (
            precision == "fp32" and onednn_linear.onednn_linear_supported()
        )
    elif transform == "chunked_encoder":
        layers = fast.pixel_decoder.transformer.layers
        assert all(isinstance(m, opt.ChunkedEncoderLayer) for m in layers)
        assert layers[0].chunk_tokens == 7
    elif transform == "decoder_masks":
        assert isinstance(fast.transformer_decoder, opt.FastDecoderMasks)
        assert not isinstance(plain.transformer_decoder, opt.FastDecoderMasks)
        assert spies["attention_mask_sizes"] == [(2, 3), (4, 6), (8, 12)]  # CFF, layers 1, 2
    if transform != "channels_last_input":
        assert not any(spies["layouts"])  # no other transform changes the input layout


def test_memory_is_cast_once_per_forward_under_autocast(plain):
    """CFF and decoder layer 0 read level 0: with one cast per forward they get the same bf16
    tensors (a cast per layer would give each layer its own copy)."""
    fast = _optimized(plain, "bf16", ("cast_memory_once",))
    seen = []

    def hook(mod, args, kwargs):
        seen.append((args[1], kwargs["memory_with_pos"]))  # kept alive: ids stay unique

    for m in fast.transformer_decoder.modules():
        if isinstance(m, CrossAttentionLayer):
            m.register_forward_pre_hook(hook, with_kwargs=True)
    _probs(fast, "bf16")
    # CFF + 3 layers over levels 0, 0, 1, 2: bf16 values and keys, 3 levels x 2 tensors cast
    assert [(v.dtype, k.dtype) for v, k in seen] == [(torch.bfloat16, torch.bfloat16)] * 4
    assert seen[0][0] is seen[1][0] and seen[0][1] is seen[1][1]
    assert len({id(t) for pair in seen for t in pair}) == 6
    seen.clear()
    _probs(fast, "bf16")  # the next forward casts its own memory (nothing kept from the last)
    assert len(seen) == 4 and seen[0][0] is seen[1][0]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_all_transforms_together_equal_the_plain_model(plain, precision):
    fast = _optimized(plain, precision, None)
    assert set(opt.optimized_transforms(fast)) == set(opt.TRANSFORMS) - (
        set() if precision == "bf16" else {"cast_memory_once"}
    )
    assert_same_scores(_probs(fast, precision), _probs(plain, precision), precision)
    # evaluation through forward() too, at the original size
    with torch.no_grad():
        out = fast([{"image": _image(*SIZE, seed=5), "height": 30, "width": 45}])
    assert out[0]["sem_seg"].shape == (7, 30, 45)


def test_environment_switch_keeps_oneDNN_off(plain, spies, monkeypatch):
    monkeypatch.setattr(onednn_linear, "_ENABLED", False)  # SEGCLIP_ONEDNN_LINEAR=0
    fast = _optimized(plain, "fp32", ("cpu_kernels",))
    _probs(fast, "fp32")
    assert spies["onednn"] == 0 and spies["short_softmax"] > 0


def test_training_model_is_rejected_and_copy_leaves_it_plain(plain):
    model = copy.deepcopy(plain).train()
    with pytest.raises(ValueError, match="eval-mode"):
        opt.optimize_for_inference(model, "cpu")
    fast = opt.inference_copy(model, "cpu")
    assert fast is not model and opt.optimized_transforms(fast) is not None
    assert model.training and opt.optimized_transforms(model) is None
    assert opt.inference_copy(fast) is fast  # already optimised: evaluated as it is
    _assert_plain(model)


def _assert_plain(model, channels_last=False):
    """No transform applied; with ``channels_last`` only the channels-last input hook (the one
    execution choice that CPU training makes too)."""
    assert not any(isinstance(m, Conv2dFoldedFrozenBN) for m in model.modules())
    assert not any(isinstance(m, opt.ChunkedEncoderLayer) for m in model.modules())
    assert not isinstance(model.transformer_decoder, opt.FastDecoderMasks)
    hooks = [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks]
    if not channels_last:
        assert hooks == []
        return
    assert hooks == [model.backbone] and not model.backbone._forward_hooks
    assert list(model.backbone._forward_pre_hooks.values()) == [opt._channels_last_hook]


def test_periodic_evaluation_during_training_keeps_the_training_model_plain(
    tiny_synthetic,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    """Training with TEST.EVAL_PERIOD evaluates an optimised copy; training goes on with the
    plain model, and its losses stay finite."""
    from detectron2.engine import HookBase

    from segclip_d2.engine import SegCLIPTrainer

    optimized = []
    real = opt.optimize_for_inference

    def spy(model, *a, **k):
        optimized.append(model)
        return real(model, *a, **k)

    monkeypatch.setattr(opt, "optimize_for_inference", spy)
    cfg = tiny_cfg(
        tmp_path,
        *("DATASETS.TEST", "('synthetic_aerial_val',)", "SOLVER.MAX_ITER", "2"),
        *("TEST.EVAL_PERIOD", "1", "SOLVER.BEST_CHECKPOINT_METRIC", ""),
    )
    losses = []

    class Losses(HookBase):
        def after_step(self):
            losses.append(self.trainer.storage.history("total_loss").latest())

    trainer = SegCLIPTrainer(cfg)
    trainer.register_hooks([Losses()])
    trainer.train()
    assert len(optimized) == 2 and all(m is not trainer.model for m in optimized)
    assert "mIoU" in trainer._last_eval_results["sem_seg"]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)  # step 2 after an eval
    assert trainer.model.training
    _assert_plain(trainer.model, channels_last=True)  # CPU training: channels-last input


@pytest.mark.parametrize(
    "src,dst",
    [
        ((64, 64), (8, 8)),
        ((64, 48), (16, 12)),
        ((32, 32), (16, 16)),
        ((30, 30), (10, 10)),
        ((36, 36), (12, 12)),
        ((20, 24), (7, 9)),
        ((16, 16), (16, 16)),
        ((8, 8), (16, 16)),
    ],
)
def test_bilinear_resize_equals_interpolate(src, dst):
    """The strided-slice route (even factors >= 4) and the fallback both give what
    F.interpolate(bilinear, align_corners=False) gives."""
    x = torch.randn(2, 5, *src)
    expected = torch.nn.functional.interpolate(x, size=dst, mode="bilinear", align_corners=False)
    torch.testing.assert_close(opt.bilinear_resize(x, dst), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_mask_logits_equals_einsum_for_every_layout(layout):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(2, 5, 6, generator=g)
    feats = torch.randn(2, 6, 9, 7, generator=g)
    if layout == "channels_last":
        feats = feats.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        feats = torch.randn(2, 6, 18, 7, generator=g)[:, :, ::2]
    expected = torch.einsum("bqc,bchw->bqhw", emb, feats)
    got = opt.mask_logits(emb, feats)
    assert got.shape == (2, 5, 9, 7)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("guidance", [False, True])
def test_decoder_masks_transform_equals_the_plain_decoder(plain, guidance):
    """On the decoder alone (channels-last mask features: the batched-matmul route) and with a
    GTG group: same outputs; with autograd the plain computation runs."""
    images = torch.stack([_image(64, 96, seed=5).float()])
    with torch.no_grad():
        mask_features, maps = plain.pixel_decoder(plain.backbone(plain._normalize(images)))
        text = plain.text_embeddings()
    mask_features = mask_features.contiguous(memory_format=torch.channels_last)
    g = None
    if guidance:
        masks = torch.zeros(2, 64, 96, dtype=torch.bool)
        masks[0, :, :40], masks[1, 30:] = True, True
        g = {"classes": [torch.tensor([1, 4])], "masks": [masks]}
    dec = plain.transformer_decoder
    fast = copy.deepcopy(dec)
    opt.fast_decoder_masks(fast)
    opt.fast_decoder_masks(fast)  # idempotent
    assert type(fast).__mro__[1:3] == (opt.FastDecoderMasks, type(dec))
    with torch.no_grad():
        expected, got = dec(maps, mask_features, text, g), fast(maps, mask_features, text, g)
    assert (expected["guidance"] is not None) == guidance
    for key in ("pred_logits", "pred_masks"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5)
    assert fast._resized_features is None  # nothing kept between forwards
    with_grad = fast(maps, mask_features, text, g)
    torch.testing.assert_close(with_grad["pred_masks"], expected["pred_masks"], rtol=0, atol=0)
