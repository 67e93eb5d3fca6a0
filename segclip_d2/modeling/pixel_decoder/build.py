"""Registry of pixel decoders."""

from detectron2.layers import ShapeSpec
from detectron2.utils.registry import Registry

PIXEL_DECODER_REGISTRY = Registry("SEGCLIP_PIXEL_DECODER")
PIXEL_DECODER_REGISTRY.__doc__ = """
Pixel decoders of SegCLIP. A registered class is built as ``cls(cfg, input_shape)`` (with
detectron2's ``@configurable`` this calls its ``from_config``) and its ``forward(features,
padding_mask=None)`` returns ``(mask_features (B, MASK_DIM, H/4, W/4), multi_scale_features)``
with the multi-scale maps ordered from the coarsest (stride 32) to the finest (stride 8).
"""


def build_pixel_decoder(cfg, input_shape: dict[str, ShapeSpec]):
    """Build the pixel decoder named by ``cfg.MODEL.SEGCLIP.PIXEL_DECODER.NAME``.

    Args:
        input_shape: the backbone's ``output_shape()``.
    """
    name = cfg.MODEL.SEGCLIP.PIXEL_DECODER.NAME
    return PIXEL_DECODER_REGISTRY.get(name)(cfg, input_shape)
