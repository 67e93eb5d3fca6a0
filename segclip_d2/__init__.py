"""segclip-d2: SegCLIP for remote-sensing semantic segmentation, as a Detectron2 project.

Importing the package registers its datasets, dataset mappers, backbones, pixel decoder and
meta-architecture in detectron2's registries.
"""

from .quiet import dependency_imports

# Imported for their registrations: dataset splits and mappers; SegCLIP, the pixel decoder and
# the CLIP ResNet backbone. They import detectron2 and fvcore, whose import-time
# torch.jit.script calls would print deprecation warnings (see .quiet).
with dependency_imports():
    import detectron2.modeling  # noqa: F401
    import fvcore.nn  # noqa: F401

    from . import data, modeling  # noqa: F401
from .config import add_segclip_config  # noqa: E402

__all__ = ["add_segclip_config"]
