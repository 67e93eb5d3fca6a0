"""Pixel decoders: turn backbone features into mask features (stride 4) and the multi-scale maps
the transformer decoder attends to. Chosen by ``MODEL.SEGCLIP.PIXEL_DECODER.NAME``."""

from .build import PIXEL_DECODER_REGISTRY, build_pixel_decoder
from .msdeformattn import MSDeformAttnEncoder, MSDeformAttnPixelDecoder

__all__ = [
    "PIXEL_DECODER_REGISTRY",
    "MSDeformAttnEncoder",
    "MSDeformAttnPixelDecoder",
    "build_pixel_decoder",
]
