"""Whether an import failed only because the torch stack is not installed.

The ONNX deployment path (``demo/demo.py --onnx``, :mod:`segclip_d2.deploy.onnx_predictor`) runs
with numpy, OpenCV, rasterio and onnxruntime only. The package ``__init__`` files import their
torch / detectron2 modules inside ``try`` and use this to tell "not installed" (skip them) from
a real error (re-raise).
"""

TORCH_STACK = ("torch", "torchvision", "detectron2", "fvcore", "open_clip")


def missing_torch_stack(error: ImportError) -> bool:
    """True when ``error`` says a module of the torch stack could not be imported."""
    name = getattr(error, "name", None) or ""
    return name.split(".")[0] in TORCH_STACK
