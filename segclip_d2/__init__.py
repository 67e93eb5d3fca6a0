"""segclip-d2: SegCLIP for remote-sensing semantic segmentation, as a Detectron2 project.

Importing the package registers its datasets, dataset mappers, backbones, pixel decoder and
meta-architecture in detectron2's registries.
"""

# Imported for their registrations: dataset splits and mappers; SegCLIP, the pixel decoder and
# the CLIP ResNet backbone.
from . import data, modeling  # noqa: F401
from .config import add_segclip_config

__all__ = ["add_segclip_config"]
