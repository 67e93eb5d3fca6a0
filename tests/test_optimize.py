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


def _optimized(plain, precision, transforms):
    fast = opt.optimize_for_inference(copy.deepcopy(plain), "cpu", precision, transforms)
    assert fast.state_dict().keys() == plain.state_dict().keys()
    return fast


@pytest.fixture
def spies(monkeypatch):
    """Counts what the transforms do at run time."""
    seen = {"onednn": 0, "short_softmax": 0, "memory_casts": 0, "layouts": []}
    real_linear, real_softmax = onednn_linear.linear, opt.short_row_softmax

    def linear(x, w, b=None):
        seen["onednn"] += onednn_linear.uses_onednn(x, w)
        return real_linear(x, w, b)

    def softmax(x):
        seen["short_softmax"] += 1
        return real_softmax(x)

    monkeypatch.setattr(onednn_linear, "linear", linear)
    monkeypatch.setattr(opt, "short_row_softmax", softmax)
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
    elif precision == "fp32":
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    else:  # bf16 reorders some roundings
        torch.testing.assert_close(got, expected, rtol=0.0, atol=2e-2)
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
    if transform != "channels_last_input":
        assert not any(spies["layouts"])  # no other transform changes the input layout


def test_memory_is_cast_once_per_forward_under_autocast(plain, monkeypatch):
    fast = _optimized(plain, "bf16", ("cast_memory_once",))
    casts, seen = [], []
    real_to = torch.Tensor.to

    def hook(mod, args, kwargs):
        seen.append((args[1].dtype, kwargs["memory_with_pos"].dtype))

    for m in fast.predictor.modules():
        if isinstance(m, CrossAttentionLayer):
            m.register_forward_pre_hook(hook, with_kwargs=True)
    monkeypatch.setattr(
        torch.Tensor, "to", lambda t, *a, **k: casts.append(1) or real_to(t, *a, **k)
    )
    _probs(fast, "bf16")
    monkeypatch.undo()
    # CFF + 3 layers see bf16 values and keys, cast from 3 levels x (values, keys) only
    assert seen == [(torch.bfloat16, torch.bfloat16)] * 4
    assert len(casts) >= 6


def test_all_transforms_together_equal_the_plain_model(plain):
    for precision, tol in (("fp32", dict(rtol=1e-4, atol=1e-5)), ("bf16", dict(rtol=0, atol=3e-2))):
        fast = _optimized(plain, precision, None)
        assert set(opt.optimized_transforms(fast)) == set(opt.TRANSFORMS) - (
            set() if precision == "bf16" else {"cast_memory_once"}
        )
        torch.testing.assert_close(_probs(fast, precision), _probs(plain, precision), **tol)
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
