"""Inference at scale: whole-image or sliding-window inference, test-time augmentation, reduced
precision (``SegInferencer``), raster reading/writing and the block-wise pipeline used by the demo
for large images and GeoTIFFs."""

from .inferencer import SegInferencer, upsample_probs
from .precision import autocast_context, effective_precision
from .slide import slide_inference, window_boxes, window_starts
from .tta import View, build_views

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
