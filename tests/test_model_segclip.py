"""SegCLIP meta-architecture on a tiny ResNet-18 model (random weights, CPU)."""

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import segclip_d2  # noqa: F401  (dataset registration)
import segclip_d2.modeling  # noqa: F401  (SegCLIP registration)
from segclip_d2.config import add_segclip_config

NUM_CLASSES = 7  # synthetic_aerial_train has the LoveDA classes


def tiny_cfg(**segclip):
    cfg = get_cfg()
    add_segclip_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "SegCLIP"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]
    cfg.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]
    cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    s = cfg.MODEL.SEGCLIP
    s.NUM_QUERIES, s.HIDDEN_DIM, s.NHEADS, s.DIM_FEEDFORWARD = 10, 32, 4, 64
    s.DEC_LAYERS, s.MASK_DIM, s.MSDA_IMPL = 3, 32, "pytorch"
    s.PIXEL_DECODER.CONVS_DIM, s.PIXEL_DECODER.ENC_LAYERS = 32, 2
    s.PIXEL_DECODER.DIM_FEEDFORWARD = 64
    s.TEXT.PRETRAINED = ""  # random init, nothing downloaded
    s.LOSS.TRAIN_NUM_POINTS = 256
    cfg.DATASETS.TRAIN = ("synthetic_aerial_train",)
    for key, value in segclip.items():
        node = s
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


_TEXT_ENCODER = []


def build(seed=0, **segclip):
    """Build from the config. All models of this file then share one text encoder (it owns no
    checkpoint state), so the costly CLIP text transformer encodes each vocabulary only once."""
    torch.manual_seed(seed)
    model = build_model(tiny_cfg(**segclip)).eval()
    if not _TEXT_ENCODER:
        _TEXT_ENCODER.append(model.text_encoder)
    model.text_encoder = _TEXT_ENCODER[0]
    return model


def _image(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


def _train_input(h, w, classes, seed=0):
    """A mapper-style training dict whose label map splits the image into vertical bands."""
    masks = torch.zeros(len(classes), h, w, dtype=torch.bool)
    for j in range(len(classes)):
        masks[j, :, j * w // len(classes) : (j + 1) * w // len(classes)] = True
    return {
        "image": _image(h, w, seed),
        "gt_classes": torch.tensor(sorted(classes), dtype=torch.long),
        "gt_masks": masks,
        "height": h,
        "width": w,
    }


@pytest.fixture(scope="module")
def model():
    return build()


def test_eval_output_at_original_size_for_non_divisible_inputs(model):
    inputs = [
        {"image": _image(50, 70), "height": 100, "width": 140},  # resized by a test mapper
        {"image": _image(45, 64, seed=1)},  # no height/width: the input's own size
    ]
    with torch.no_grad():
        out = model(inputs)
    assert out[0]["sem_seg"].shape == (NUM_CLASSES, 100, 140)
    assert out[1]["sem_seg"].shape == (NUM_CLASSES, 45, 64)
    for o in out:
        assert torch.isfinite(o["sem_seg"]).all() and (o["sem_seg"] >= 0).all()


def test_predict_sem_seg_probs_crops_padding(model):
    images = torch.stack([_image(50, 70, seed=i).float() for i in range(2)])
    with torch.no_grad():
        probs = model.predict_sem_seg_probs(images)
        single = model.predict_sem_seg_probs(images[1:])
    assert probs.shape == (2, NUM_CLASSES, 50, 70)
    torch.testing.assert_close(probs[1:], single, rtol=1e-4, atol=1e-5)  # batch-independent
    with pytest.raises(ValueError, match=r"\(B, 3, h, w\)"):
        model.predict_sem_seg_probs(images[0])


def test_text_encoder_runs_once_across_eval_forwards(model):
    encoder = model.text_encoder
    before = encoder.num_encoder_calls
    with torch.no_grad():
        model([{"image": _image(64, 64)}])
        first = encoder.num_encoder_calls
        for i in range(3):
            model([{"image": _image(64, 64, seed=i)}])
    assert first - before <= 1  # encoded at most once (not at all if already cached)
    assert 1 <= encoder.num_encoder_calls == first  # ... and never again


def test_train_forward_returns_finite_losses_and_backward_works():
    model = build(seed=2).train()
    batch = [
        _train_input(64, 64, [1, 3]),
        # no labelled pixel at all (everything ignore): empty gt_classes / gt_masks
        {
            "image": _image(56, 64, seed=3),
            "gt_classes": torch.zeros(0, dtype=torch.long),
            "gt_masks": torch.zeros(0, 56, 64, dtype=torch.bool),
        },
    ]
    calls = model.text_encoder.num_encoder_calls
    losses = model(batch)
    assert {"loss_ce", "loss_mask", "loss_dice", "loss_gtg_ce", "loss_ce_0"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.text_encoder.num_encoder_calls <= max(calls, 1)  # GTG indexes the cache
    grads = [p.grad for p in model.transformer_decoder.parameters() if p.requires_grad]
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert model.transformer_decoder.text_queries.text_proj.weight.grad.abs().sum() > 0
    assert model.backbone.res2[0].conv1.weight.grad.abs().sum() > 0

    model.zero_grad()
    empty = [batch[1], batch[1]]  # a batch without any labelled pixel
    losses = model(empty)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()

    with pytest.raises(ValueError, match="gt_classes"):
        model([{"image": _image(64, 64)}])


def test_gtg_and_cff_switches_keep_checkpoints_interchangeable(model):
    keys = set(model.state_dict())
    no_gtg = build(seed=4, **{"GT_GUIDANCE.ENABLED": False})
    no_cff = build(seed=4, CFF_ENABLED=False)
    assert set(no_gtg.state_dict()) == keys
    # CFF off builds no CFF module (DDP would see unused parameters); everything else loads
    assert keys - set(no_cff.state_dict()) == {
        k for k in keys if k.startswith("transformer_decoder.cff.")
    }
    assert any(k.startswith("transformer_decoder.cff.") for k in keys)
    # the frozen CLIP text tower is not part of the checkpoint
    assert not any(k.startswith("text_encoder.") for k in keys)

    # eval output is the same whether GTG is enabled or not (same weights)
    no_gtg.load_state_dict(model.state_dict())
    inputs = [{"image": _image(64, 96, seed=7)}]
    with torch.no_grad():
        a = model(inputs)[0]["sem_seg"]
        b = no_gtg(inputs)[0]["sem_seg"]
        no_cff.load_state_dict(model.state_dict(), strict=False)
        c = no_cff(inputs)[0]["sem_seg"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)  # while CFF really is part of the inference path


def test_set_vocabulary_with_text_head_changes_k():
    model = build(seed=8, CLASS_HEAD="text")
    with torch.no_grad():
        assert model([{"image": _image(64, 64)}])[0]["sem_seg"].shape[0] == NUM_CLASSES
        calls = model.text_encoder.num_encoder_calls
        model.set_vocabulary(["road", "water", "small_vehicle"])
        for i in range(2):
            out = model([{"image": _image(64, 64, seed=i)}])[0]["sem_seg"]
            assert out.shape == (3, 64, 64)
    assert model.text_encoder.num_encoder_calls == calls + 1
    with pytest.raises(ValueError, match="NUM_QUERIES"):
        model.set_vocabulary([f"class {i}" for i in range(11)])


def test_set_vocabulary_is_rejected_with_linear_head(model):
    with pytest.raises(ValueError, match="CLASS_HEAD 'text'"):
        model.set_vocabulary(["road", "water"])
    assert model.vocabulary_size == model.num_train_classes == NUM_CLASSES


def test_low_and_full_resolution_postprocess_agree(model):
    images = torch.stack([_image(64, 96, seed=9).float()])
    with torch.no_grad():
        low = model.predict_sem_seg_probs(images)
        model.postprocess = "full"
        try:
            full = model.predict_sem_seg_probs(images)
        finally:
            model.postprocess = "low"
    assert full.shape == low.shape == (1, NUM_CLASSES, 64, 96)
    agree = (low.argmax(1) == full.argmax(1)).float().mean()
    assert agree > 0.9, f"argmax agreement {agree:.3f}"
    assert (low - full).abs().mean() < 0.05 * full.abs().mean()


@pytest.mark.parametrize("postprocess", ["low", "full"])
def test_semantic_inference_is_the_formula_of_segclip_md(model, monkeypatch, postprocess):
    """Every pixel: sum over queries of softmax(class)[:K] * sigmoid(mask), the K maps upsampled
    ("low", SEGCLIP.md) or the N mask logits upsampled first ("full"), padding cropped."""
    import torch.nn.functional as F

    monkeypatch.setattr(model, "postprocess", postprocess)
    images = torch.stack([_image(61, 90, seed=4).float()])
    outputs = []
    model.transformer_decoder.register_forward_hook(lambda m, a, o: outputs.append(o))
    with torch.no_grad():
        got = model.predict_sem_seg_probs(images)
    model.transformer_decoder._forward_hooks.clear()
    cls = outputs[0]["pred_logits"].softmax(-1)[..., :-1]  # (1, N, K)
    masks = outputs[0]["pred_masks"]  # (1, N, 64/4, 96/4): padded to 64 x 96

    def up(x):
        return F.interpolate(x, size=(64, 96), mode="bilinear", align_corners=False)

    if postprocess == "low":
        expected = up(torch.einsum("bqk,bqhw->bkhw", cls, masks.sigmoid()))
    else:
        expected = torch.einsum("bqk,bqhw->bkhw", cls, up(masks).sigmoid())
    torch.testing.assert_close(got, expected[:, :, :61, :90], rtol=1e-6, atol=1e-6)


def test_checkpoints_with_the_old_decoder_name_load(model):
    """State dicts written when the transformer decoder was called ``predictor`` load into
    ``transformer_decoder`` (strictly: every key mapped, none missing)."""
    new = model.state_dict()
    old = {k.replace("transformer_decoder.", "predictor.", 1): v for k, v in new.items()}
    assert any(k.startswith("predictor.") for k in old)
    fresh = build(seed=11)
    assert not torch.equal(
        fresh.transformer_decoder.mask_embed.layers[0].weight,
        model.transformer_decoder.mask_embed.layers[0].weight,
    )
    fresh.load_state_dict(old)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, new[k]), k
    wrapped = torch.nn.ModuleDict({"segclip": build(seed=12)})  # nested: prefix kept
    wrapped.load_state_dict({f"segclip.{k}": v for k, v in old.items()})
    assert torch.equal(wrapped["segclip"].pixel_mean, model.pixel_mean)
    torch.testing.assert_close(
        wrapped["segclip"].transformer_decoder.decoder_norm.weight,
        model.transformer_decoder.decoder_norm.weight,
    )


def test_the_checkpointer_loads_an_old_checkpoint_without_missing_keys(model, tmp_path, caplog):
    from detectron2.checkpoint import DetectionCheckpointer

    old = {
        k.replace("transformer_decoder.", "predictor.", 1): v for k, v in model.state_dict().items()
    }
    torch.save({"model": old}, tmp_path / "old.pth")
    fresh = build(seed=13)
    with caplog.at_level("WARNING"):
        DetectionCheckpointer(fresh).load(str(tmp_path / "old.pth"))
    assert "not found" not in caplog.text and "predictor" not in caplog.text, caplog.text
    torch.testing.assert_close(
        fresh.transformer_decoder.class_head.linear.weight,
        model.transformer_decoder.class_head.linear.weight,
    )


def test_bgr_input_format_is_rejected():
    cfg = tiny_cfg()
    cfg.INPUT.FORMAT = "BGR"
    with pytest.raises(ValueError, match="RGB"):
        build_model(cfg)


def test_cpu_input_gets_canonical_channels_last_strides():
    """An image batch made from an HWC array (batch stride 3) must reach the backbone with
    canonical channels-last strides, or oneDNN runs the whole backbone in NCHW."""
    from segclip_d2.predict.optimize import canonical_channels_last as _canonical_channels_last

    hwc = torch.randn(40, 24, 3).permute(2, 0, 1)[None]
    assert hwc.is_contiguous(memory_format=torch.channels_last) and hwc.stride(0) == 3
    out = _canonical_channels_last(hwc)
    assert out.stride() == (3 * 40 * 24, 1, 24 * 3, 3)
    torch.testing.assert_close(out, hwc)
    conv = torch.nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        assert conv(out).is_contiguous(memory_format=torch.channels_last)
    nchw = torch.randn(2, 3, 8, 8)
    assert _canonical_channels_last(nchw).stride() == (192, 1, 24, 3)
    ready = nchw.contiguous(memory_format=torch.channels_last)
    assert _canonical_channels_last(ready) is ready  # no copy when already canonical
