"""segclip-d2: SegCLIP for remote-sensing semantic segmentation, as a Detectron2 project.

Importing the package registers its datasets, backbones, meta-architecture and mappers.
"""

from . import data  # noqa: F401  (dataset registration)
from .config import add_segclip_config

__all__ = ["add_segclip_config"]
