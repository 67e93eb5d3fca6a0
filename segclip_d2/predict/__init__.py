"""Running a built model: whole-image or sliding-window inference, test-time augmentation,
reduced precision (``SegInferencer``), the inference-only rewrite (:mod:`.optimize`) and the
block-wise prediction of large rasters (:mod:`.blocks`). Without torch only :mod:`.windows` and
:mod:`.blocks` import."""

from .._torchless import missing_torch_stack

try:
    from .inferencer import SegInferencer, SegmentorWithInference, upsample_probs
    from .precision import autocast_context, effective_precision
    from .slide import slide_inference, window_boxes, window_starts
    from .tta import View, build_views
except ImportError as _e:
    if not missing_torch_stack(_e):
        raise

__all__ = [
    "SegInferencer",
    "SegmentorWithInference",
    "View",
    "autocast_context",
    "build_views",
    "effective_precision",
    "slide_inference",
    "upsample_probs",
    "window_boxes",
    "window_starts",
]
