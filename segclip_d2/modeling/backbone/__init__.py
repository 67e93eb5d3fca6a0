"""Backbones. Importing this package registers ``build_clip_resnet_backbone`` in detectron2's
``BACKBONE_REGISTRY`` (detectron2's own ``build_resnet_backbone`` is registered by detectron2)."""

from .clip_resnet import CLIPResNetBackbone, build_clip_resnet_backbone

__all__ = ["CLIPResNetBackbone", "build_clip_resnet_backbone"]
