"""Layers of segclip-d2: multi-scale deformable attention (compiled op + PyTorch reference)."""

from .ms_deform_attn import (
    MSDeformAttn,
    extension_available,
    extension_has_cuda,
    ms_deform_attn,
    ms_deform_attn_pytorch,
)

__all__ = [
    "MSDeformAttn",
    "extension_available",
    "extension_has_cuda",
    "ms_deform_attn",
    "ms_deform_attn_pytorch",
]
