"""CLIP's modified ResNet (open_clip ``ModifiedResNet``) as a detectron2 backbone.

The image tower of a ResNet CLIP (RN50, RN101, RN50x4 ...) without its attention-pooling head:
a stem of three 3x3 convolutions + 2x2 average pooling (stride 4), then four bottleneck stages with
anti-aliased (average-pool) downsampling, returned as res2..res5 at strides 4/8/16/32
(256/512/1024/2048 channels for RN50). Inputs are already normalised by the meta-architecture
(``MODEL.PIXEL_MEAN/STD`` set to CLIP's statistics in the CLIP configs).

Inputs with other bands than RGB (``INPUT.BANDS``, e.g. red, green, blue, nir) get a widened
first convolution, built from the pretrained RGB one by :func:`widen_first_conv` (the rule is
documented in :mod:`segclip_d2.checkpoint.widen`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import torch
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn

from segclip_d2.checkpoint.pretrained import load_open_clip_model
from segclip_d2.checkpoint.widen import widen_rgb_kernels
from segclip_d2.data.bands import RGB_BANDS, check_band_names

logger = logging.getLogger(__name__)

__all__ = ["CLIPResNetBackbone", "build_clip_resnet_backbone", "widen_first_conv"]

_STAGES = ("res2", "res3", "res4", "res5")
_NORMS = ("FrozenBN", "BN", "SyncBN")


class _CLIPStem(nn.Module):
    """CLIP ResNet stem: 3 convolutions (the first with stride 2) + 2x2 average pooling."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        for name in ("conv1", "bn1", "act1", "conv2", "bn2", "act2", "conv3", "bn3", "act3"):
            self.add_module(name, copy.deepcopy(getattr(visual, name)))
        self.avgpool = nn.AvgPool2d(2)
        self.out_channels = visual.conv3.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.act3(self.bn3(self.conv3(x)))
        return self.avgpool(x)


@torch.no_grad()
def widen_first_conv(conv: nn.Conv2d, bands: Sequence[str]) -> nn.Conv2d:
    """A copy of the RGB convolution ``conv`` (in_channels 3, in R, G, B order) taking ``bands``:
    its kernels widened by the rule of :mod:`segclip_d2.checkpoint.widen` (red, green and blue
    kept exactly; every other band the mean RGB kernel scaled to a visible band's activation)."""
    if conv.in_channels != 3:
        raise ValueError(f"widen_first_conv takes an RGB convolution, got {conv.in_channels}")
    weight = widen_rgb_kernels(conv.weight, bands)
    wide = nn.Conv2d(
        weight.shape[1],
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
        conv.padding_mode,
        device=weight.device,
        dtype=weight.dtype,
    )
    wide.weight.copy_(weight)
    if conv.bias is not None:
        wide.bias.copy_(conv.bias)
    return wide


def _freeze(module: nn.Module) -> nn.Module:
    """No gradients, and BatchNorm turned into FrozenBatchNorm2d (statistics no longer update)."""
    module.requires_grad_(False)
    return FrozenBatchNorm2d.convert_frozen_batchnorm(module)


def _check_arguments(out_features: list[str], freeze_at: int, norm: str) -> None:
    unknown = [f for f in out_features if f not in _STAGES]
    if unknown or not out_features:
        raise ValueError(
            f"out_features must be a non-empty subset of {_STAGES}, got {out_features}"
        )
    if not 0 <= freeze_at <= 5:
        raise ValueError(f"freeze_at must be in 0..5, got {freeze_at}")
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")


class CLIPResNetBackbone(Backbone):
    """open_clip ResNet image tower returning a dict of res2..res5 feature maps."""

    def __init__(
        self,
        model_name: str = "RN50",
        pretrained: str = "openai",
        out_features: Sequence[str] = _STAGES,
        freeze_at: int = 0,
        norm: str = "FrozenBN",
        require_pretrained: bool = False,
        bands: Sequence[str] = RGB_BANDS,
    ):
        """
        Args:
            model_name: open_clip ResNet model name ("RN50", "RN101", "RN50x4" ...).
            pretrained: open_clip tag, local checkpoint path, or "" for random init (the offline
                rules of :mod:`segclip_d2.checkpoint.pretrained`).
            out_features: subset of res2..res5 to return.
            freeze_at: 0 = train everything, 1 = freeze the stem, 2 = stem + res2, ... 5 = all.
            norm: "FrozenBN" (BatchNorm as a fixed affine; for small per-GPU batches), "BN"
                (trainable BatchNorm) or "SyncBN" (needs a distributed process group).
            require_pretrained: raise instead of warning + random init when a tag's weights are
                missing.
            bands: input band names; other than red, green, blue in that order, the first
                convolution is widened by :func:`widen_first_conv`.
        """
        super().__init__()
        out_features = list(out_features)
        _check_arguments(out_features, freeze_at, norm)

        clip_model, self.weights_path = load_open_clip_model(
            model_name,
            pretrained,
            require_pretrained=require_pretrained,
            user="CLIP ResNet backbone",
            config_key="MODEL.CLIP_RESNET.PRETRAINED",
            require_key="MODEL.CLIP_RESNET.REQUIRE_PRETRAINED",
        )
        from open_clip.modified_resnet import ModifiedResNet

        visual = clip_model.visual
        if not isinstance(visual, ModifiedResNet):
            raise ValueError(
                f"open_clip model '{model_name}' has a {type(visual).__name__} image tower; "
                "CLIPResNetBackbone needs a ResNet CLIP (RN50, RN101, RN50x4, RN50x16, RN50x64)"
            )

        # Copies: the cached CLIP model is shared and frozen, this backbone is trained.
        self.stem = _CLIPStem(visual)
        self.bands = check_band_names(bands, "INPUT.BANDS")
        if tuple(self.bands) != RGB_BANDS:
            self.stem.conv1 = widen_first_conv(self.stem.conv1, self.bands)
        self._add_stages(visual, out_features)

        self.requires_grad_(True)
        if norm == "FrozenBN":
            FrozenBatchNorm2d.convert_frozen_batchnorm(self)
        elif norm == "SyncBN":
            nn.SyncBatchNorm.convert_sync_batchnorm(self)
        self.freeze(freeze_at)

    def _add_stages(self, visual: nn.Module, out_features: list[str]) -> None:
        """Copies of CLIP's layer1.. up to the last requested stage, as res2.., with their
        strides and channels."""
        self._out_features = out_features
        self._out_feature_strides = {}
        self._out_feature_channels = {}
        last = max(_STAGES.index(f) for f in out_features)
        self.stage_names = list(_STAGES[: last + 1])
        stride = 4
        for i, name in enumerate(self.stage_names):
            stage = copy.deepcopy(getattr(visual, f"layer{i + 1}"))
            stride *= stage[0].stride
            self.add_module(name, stage)
            self._out_feature_strides[name] = stride
            self._out_feature_channels[name] = stage[-1].conv3.out_channels

    def freeze(self, freeze_at: int = 0) -> CLIPResNetBackbone:
        """Freeze the first ``freeze_at`` blocks (1 = stem, 2 = stem + res2, ...)."""
        if freeze_at >= 1:
            self.stem = _freeze(self.stem)
        for i, name in enumerate(self.stage_names, start=2):
            if freeze_at >= i:
                self.add_module(name, _freeze(getattr(self, name)))
        return self

    @property
    def size_divisibility(self) -> int:
        return 32

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """
        Args:
            x: (B, C, H, W) normalised images, C = len(bands).

        Returns:
            {"res2": (B, C2, H/4, W/4), ..., "res5": (B, C5, H/32, W/32)} for the requested names.
        """
        if x.dim() != 4 or x.shape[1] != len(self.bands):
            raise ValueError(
                f"CLIPResNetBackbone takes (B, {len(self.bands)}, H, W) images (bands "
                f"{self.bands}), got {tuple(x.shape)}"
            )
        outputs = {}
        x = self.stem(x)  # (B, width, H/4, W/4)
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }


@BACKBONE_REGISTRY.register()
def build_clip_resnet_backbone(cfg, input_shape: ShapeSpec) -> CLIPResNetBackbone:
    """Build the CLIP ResNet backbone from ``MODEL.CLIP_RESNET.*`` (``MODEL.BACKBONE.NAME:
    build_clip_resnet_backbone``)."""
    if input_shape.channels != len(cfg.INPUT.BANDS):
        raise ValueError(
            f"MODEL.PIXEL_MEAN gives {input_shape.channels} input channels but INPUT.BANDS names "
            f"{len(cfg.INPUT.BANDS)} ({list(cfg.INPUT.BANDS)})"
        )
    return CLIPResNetBackbone(
        model_name=cfg.MODEL.CLIP_RESNET.MODEL_NAME,
        pretrained=cfg.MODEL.CLIP_RESNET.PRETRAINED,
        out_features=cfg.MODEL.CLIP_RESNET.OUT_FEATURES,
        freeze_at=cfg.MODEL.CLIP_RESNET.FREEZE_AT,
        norm=cfg.MODEL.CLIP_RESNET.NORM,
        require_pretrained=cfg.MODEL.CLIP_RESNET.REQUIRE_PRETRAINED,
        bands=list(cfg.INPUT.BANDS),
    )
