"""SegCLIP model parts: backbone, pixel decoder, transformer decoder and meta-architecture.

Importing this package registers them in their registries.
"""

from . import backbone, meta_arch, pixel_decoder, transformer_decoder  # noqa: F401  (registration)
from .meta_arch import SegCLIP
from .pixel_decoder import PIXEL_DECODER_REGISTRY, build_pixel_decoder
from .text_encoder import FrozenCLIPTextEncoder
from .transformer_decoder import SegCLIPTransformerDecoder

__all__ = [
    "PIXEL_DECODER_REGISTRY",
    "FrozenCLIPTextEncoder",
    "SegCLIP",
    "SegCLIPTransformerDecoder",
    "build_pixel_decoder",
]
