"""Layers of segclip-d2: multi-scale deformable attention (compiled op + PyTorch reference).

The function lives at ``segclip_d2.layers.ms_deform_attn.ms_deform_attn``; it is not re-exported
here so that ``segclip_d2.layers.ms_deform_attn`` always names the module.
"""

from .ms_deform_attn import (
    MSDeformAttn,
    extension_available,
    extension_has_cuda,
    ms_deform_attn_pytorch,
)

__all__ = [
    "MSDeformAttn",
    "extension_available",
    "extension_has_cuda",
    "ms_deform_attn_pytorch",
]
