"""segclip-d2: SegCLIP for remote-sensing semantic segmentation, as a Detectron2 project.

Importing the package registers its datasets, dataset mappers, backbones, pixel decoder and
meta-architecture in detectron2's registries. Without torch / detectron2 installed only the
torch-free parts import (the ONNX deployment path: ``segclip_d2.deploy.onnx_predictor``, the
raster I/O and visualisation of ``segclip_d2.predict``).
"""

from ._torchless import missing_torch_stack

try:
    from .quiet import dependency_imports

    # Imported for their registrations: dataset splits and mappers; SegCLIP, the pixel decoder
    # and the CLIP ResNet backbone. They import detectron2 and fvcore, whose import-time
    # torch.jit.script calls would print deprecation warnings (see .quiet).
    with dependency_imports():
        import detectron2.modeling  # noqa: F401
        import fvcore.nn  # noqa: F401

        from . import data, modeling  # noqa: F401
    from .config import add_segclip_config
except ImportError as _e:
    if not missing_torch_stack(_e):
        raise
    _TORCH_STACK_ERROR = _e

    def __getattr__(name):
        if name == "add_segclip_config":
            raise ImportError(
                f"segclip_d2.{name} needs torch and detectron2 ({_TORCH_STACK_ERROR})"
            ) from _TORCH_STACK_ERROR
        raise AttributeError(name)


__all__ = ["add_segclip_config"]
