"""segclip-d2: SegCLIP for remote-sensing semantic segmentation, as a Detectron2 project.

Importing the package registers its datasets, dataset mappers, backbones, pixel decoder and
meta-architecture in detectron2's registries.
"""

from . import data  # noqa: F401  (dataset splits and mappers)
from . import modeling  # noqa: F401  (SegCLIP, MSDeformAttnPixelDecoder, CLIP ResNet backbone)
from .config import add_segclip_config

__all__ = ["add_segclip_config"]
