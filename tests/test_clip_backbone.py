"""CLIP ResNet (open_clip ModifiedResNet) detectron2 backbone, random init, offline."""

import copy

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import build_backbone
from torch import nn

from segclip_d2.checkpoint import pretrained as weights
from segclip_d2.config import add_segclip_config
from segclip_d2.modeling.backbone import CLIPResNetBackbone

EXPECTED = {"res2": (256, 4), "res3": (512, 8), "res4": (1024, 16), "res5": (2048, 32)}


pytestmark = pytest.mark.usefixtures("hub_offline")


def _clip_features(visual: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """res2..res5 of open_clip's own image tower (eval mode), as the reference."""
    with torch.no_grad():
        feats = visual.forward_intermediates(x, intermediates_only=True)["image_intermediates"]
    return dict(zip(["stem", "res2", "res3", "res4", "res5"], feats))


def test_shapes_strides_channels_via_registry():
    cfg = add_segclip_config(get_cfg())
    cfg.MODEL.BACKBONE.NAME = "build_clip_resnet_backbone"
    cfg.MODEL.CLIP_RESNET.PRETRAINED = ""
    backbone = build_backbone(cfg)
    assert isinstance(backbone, CLIPResNetBackbone)
    assert backbone.size_divisibility == 32
    shapes = backbone.output_shape()
    assert {k: (v.channels, v.stride) for k, v in shapes.items()} == EXPECTED
    backbone.eval()
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, 64, 64))
    assert list(out) == ["res2", "res3", "res4", "res5"]
    for name, (channels, stride) in EXPECTED.items():
        assert out[name].shape == (2, channels, 64 // stride, 64 // stride)


def test_matches_open_clip_image_tower_and_subset_of_outputs():
    backbone = CLIPResNetBackbone(pretrained="", out_features=["res3", "res4"]).eval()
    assert not hasattr(backbone, "res5")  # stages past the last requested one are not built
    assert set(backbone.output_shape()) == {"res3", "res4"}
    shared, _ = weights.load_open_clip_model("RN50", "")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = backbone(x)
    ref = _clip_features(shared.visual, x)
    assert set(out) == {"res3", "res4"}
    torch.testing.assert_close(out["res3"], ref["res3"])
    torch.testing.assert_close(out["res4"], ref["res4"])


def test_freeze_at_and_norm():
    backbone = CLIPResNetBackbone(pretrained="", freeze_at=2, norm="BN")
    frozen = [backbone.stem, backbone.res2]
    trainable = [backbone.res3, backbone.res4, backbone.res5]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for m in trainable for p in m.parameters())
    assert all(not isinstance(m, nn.BatchNorm2d) for f in frozen for m in f.modules()), (
        "frozen stages must not update BatchNorm statistics"
    )
    assert any(isinstance(m, nn.BatchNorm2d) for m in backbone.res3.modules())

    backbone.train()
    out = backbone(torch.randn(2, 3, 64, 64))
    sum(v.float().mean() for v in out.values()).backward()
    assert backbone.res3[0].conv1.weight.grad is not None
    assert backbone.stem.conv1.weight.grad is None

    everything = CLIPResNetBackbone(pretrained="", freeze_at=5)
    assert not any(p.requires_grad for p in everything.parameters())
    default = CLIPResNetBackbone(pretrained="")  # FrozenBN, nothing frozen
    assert all(p.requires_grad for p in default.parameters())
    bns = [m for m in default.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert bns and not any(isinstance(m, nn.BatchNorm2d) for m in default.modules())


def test_training_does_not_touch_the_shared_clip_model():
    shared, _ = weights.load_open_clip_model("RN50", "")
    before = shared.visual.conv1.weight.clone()
    running_before = shared.visual.bn1.running_mean.clone()
    backbone = CLIPResNetBackbone(pretrained="", norm="BN").train()
    opt = torch.optim.SGD(backbone.parameters(), lr=1.0)
    backbone(torch.randn(2, 3, 64, 64))["res2"].mean().backward()
    opt.step()
    assert not torch.equal(backbone.stem.conv1.weight, before)
    assert not torch.equal(backbone.stem.bn1.running_mean, running_before)
    assert torch.equal(shared.visual.conv1.weight, before)
    assert torch.equal(shared.visual.bn1.running_mean, running_before)
    assert not shared.visual.training


def test_weights_from_local_checkpoint(tmp_path, private_model_cache):
    shared, _ = weights.load_open_clip_model("RN50", "")
    saved = copy.deepcopy(shared)
    with torch.no_grad():  # weights that differ from the seeded random init
        for p in saved.visual.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / "rn50.pt"
    torch.save(saved.state_dict(), path)

    backbone = CLIPResNetBackbone(pretrained=str(path)).eval()
    assert backbone.weights_path == str(path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = backbone(x)
        random_init = CLIPResNetBackbone(pretrained="").eval()(x)
    ref = _clip_features(saved.visual, x)
    for name in EXPECTED:
        torch.testing.assert_close(out[name], ref[name], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out["res5"], random_init["res5"], atol=1e-3)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="out_features"):
        CLIPResNetBackbone(pretrained="", out_features=["res6"])
    with pytest.raises(ValueError, match="freeze_at"):
        CLIPResNetBackbone(pretrained="", freeze_at=7)
    with pytest.raises(ValueError, match="norm"):
        CLIPResNetBackbone(pretrained="", norm="GN")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        CLIPResNetBackbone(pretrained="")(torch.randn(3, 64, 64))
    cfg = add_segclip_config(get_cfg())
    cfg.MODEL.CLIP_RESNET.PRETRAINED = ""
    from segclip_d2.modeling.backbone.clip_resnet import build_clip_resnet_backbone

    with pytest.raises(ValueError, match="4 input channels but INPUT.BANDS names 3"):
        build_clip_resnet_backbone(cfg, ShapeSpec(channels=4))


def test_missing_required_weights_error_names_backbone_keys(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(weights, "_RESOLVED", {})
    cfg = add_segclip_config(get_cfg())
    cfg.MODEL.BACKBONE.NAME = "build_clip_resnet_backbone"
    cfg.MODEL.CLIP_RESNET.REQUIRE_PRETRAINED = True
    with pytest.raises(weights.PretrainedWeightsError, match="MODEL.CLIP_RESNET.PRETRAINED"):
        build_backbone(cfg)


def test_text_encoder_and_backbone_each_warn_once(monkeypatch, tmp_path, caplog):
    import logging

    import huggingface_hub.constants

    from segclip_d2.modeling.text_encoder import FrozenCLIPTextEncoder

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(weights, "_RESOLVED", {})
    monkeypatch.setattr(weights, "_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="segclip_d2.checkpoint.pretrained"):
        for _ in range(2):
            FrozenCLIPTextEncoder(pretrained="openai")(["road"])  # loads the tower: warns
            CLIPResNetBackbone(pretrained="openai", out_features=["res2"])
    messages = [
        r.getMessage() for r in caplog.records if r.name == "segclip_d2.checkpoint.pretrained"
    ]
    assert len(messages) == 2
    assert "MODEL.SEGCLIP.TEXT.PRETRAINED" in messages[0]
    assert "MODEL.CLIP_RESNET.PRETRAINED" in messages[1]
