"""Inference at scale: whole-image or sliding-window inference, test-time augmentation, reduced
precision (``SegInferencer``), raster reading/writing and the block-wise pipeline used by the demo
for large images and GeoTIFFs. Without torch only the raster I/O (``io``), ``visualize`` and the
block pipeline (``pipeline``) import."""

from .._torchless import missing_torch_stack

try:
    from .inferencer import SegInferencer, upsample_probs
    from .precision import autocast_context, effective_precision
    from .slide import slide_inference, window_boxes, window_starts
    from .tta import View, build_views
except ImportError as _e:
    if not missing_torch_stack(_e):
        raise

__all__ = [
    "SegInferencer",
    "View",
    "autocast_context",
    "build_views",
    "effective_precision",
    "slide_inference",
    "upsample_probs",
    "window_boxes",
    "window_starts",
]
