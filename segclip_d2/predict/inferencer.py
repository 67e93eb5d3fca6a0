"""``SegInferencer``: whole-image or sliding-window inference, optional TTA and reduced precision,
around any ``predict_fn(images (B, 3, h, w)) -> (B, K, h, w)`` class-probability function, and
:class:`SegmentorWithInference`, which wraps a built model with it (as detectron2's ``*WithTTA``
wrappers do) so that the model itself never knows how it is run."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import nn

from .precision import autocast_context, check_precision
from .slide import BLENDS, slide_inference
from .tta import View, build_views

logger = logging.getLogger(__name__)

# predict_fn(images (B, 3, h, w) float RGB 0..255) -> (B, K, h, w) class probabilities
PredictFn = Callable[[torch.Tensor], torch.Tensor]

MODES = ("whole", "slide")


class SegInferencer:
    """Turns a batch-level class-probability function into full-image inference.

    ``__call__(predict_fn, image (3, H, W)) -> (K, H, W)`` float32 probabilities. ``predict_fn``
    takes batches of any size (the model pads to its size divisibility itself and crops back).
    ``mode="slide"`` runs windows of ``crop_size`` every ``stride`` pixels, ``batch_size``
    at a time, blending overlaps with a taper (``blend``); windows shrink to the image where it
    is smaller than the crop, so a crop covering the image gives exactly the whole-image result.
    With ``tta_enabled`` every view of :func:`~segclip_d2.predict.tta.build_views` goes
    through the same mode and the mapped-back probabilities are averaged.
    """

    @configurable
    def __init__(
        self,
        *,
        mode: str = "whole",
        crop_size: Sequence[int] = (512, 512),
        stride: Sequence[int] = (341, 341),
        batch_size: int = 4,
        blend: str = "cosine",
        tta_enabled: bool = False,
        tta_flips: Sequence[str] = (),
        tta_rotations: Sequence[int] = (),
        tta_scales: Sequence[float] = (1.0,),
        precision: str = "fp32",
    ):
        mode = str(mode).lower()
        if mode not in MODES:
            raise ValueError(f"unknown TEST.MODE {mode!r}; choose one of {MODES}")
        crop_size = _pair(crop_size, "TEST.SLIDE.CROP_SIZE")
        stride = _pair(stride, "TEST.SLIDE.STRIDE")
        if mode == "slide" and any(s > c for s, c in zip(stride, crop_size)):
            raise ValueError(
                f"TEST.SLIDE.STRIDE {stride} is larger than TEST.SLIDE.CROP_SIZE {crop_size}: "
                "some pixels would never be predicted"
            )
        if int(batch_size) < 1:
            raise ValueError(f"TEST.SLIDE.BATCH_SIZE must be >= 1, got {batch_size}")
        self.mode = mode
        self.crop_size = crop_size
        self.stride = stride
        self.batch_size = int(batch_size)
        self.blend = str(blend).lower()
        if self.blend not in BLENDS:
            raise ValueError(f"unknown TEST.SLIDE.BLEND {blend!r}; choose one of {BLENDS}")
        self.views: list[View] = (
            build_views(tta_flips, tta_rotations, tta_scales) if tta_enabled else [View()]
        )
        self.precision = check_precision(precision)
        # Number of predict_fn calls made (for benchmarks and tests).
        self.num_predict_calls = 0

    @classmethod
    def from_config(cls, cfg):
        return {
            "mode": cfg.TEST.MODE,
            "crop_size": tuple(cfg.TEST.SLIDE.CROP_SIZE),
            "stride": tuple(cfg.TEST.SLIDE.STRIDE),
            "batch_size": cfg.TEST.SLIDE.BATCH_SIZE,
            "blend": cfg.TEST.SLIDE.BLEND,
            "tta_enabled": cfg.TEST.TTA.ENABLED,
            "tta_flips": tuple(cfg.TEST.TTA.FLIPS),
            "tta_rotations": tuple(cfg.TEST.TTA.ROTATIONS),
            "tta_scales": tuple(cfg.TEST.TTA.SCALES),
            "precision": cfg.TEST.PRECISION,
        }

    def __repr__(self) -> str:
        extra = (
            f", crop={self.crop_size}, stride={self.stride}, blend={self.blend}"
            if self.mode == "slide"
            else ""
        )
        return (
            f"SegInferencer(mode={self.mode}{extra}, views={len(self.views)}, "
            f"precision={self.precision})"
        )

    # ------------------------------------------------------------------ running
    def __call__(self, predict_fn: PredictFn, image: torch.Tensor) -> torch.Tensor:
        """Class probabilities (K, H, W) float32 of ``image`` (C, H, W): the model's input bands
        (RGB 0..255 for RGB models); the model checks C."""
        if image.dim() != 3:
            raise ValueError(f"expected an image of shape (C, H, W), got {tuple(image.shape)}")
        image = image.float()
        size = (int(image.shape[1]), int(image.shape[2]))
        with torch.no_grad():
            total = None  # (K, H, W)
            for view in self.views:
                probs = view.invert(self._infer_one(predict_fn, view.apply(image)), size)
                total = probs if total is None else total.add_(probs)
            if len(self.views) > 1:
                total /= len(self.views)
        return total

    def _infer_one(self, predict_fn: PredictFn, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) -> (K, H, W) with the configured mode, no TTA."""

        def run(batch):
            return self._run_batch(predict_fn, batch)

        if self.mode == "slide":
            return slide_inference(
                run, image, self.crop_size, self.stride, self.batch_size, self.blend
            )
        return run(image[None])[0]

    def _run_batch(self, predict_fn: PredictFn, batch: torch.Tensor) -> torch.Tensor:
        """Predict (B, 3, h, w) at the configured precision -> (B, K, h, w) float32."""
        with autocast_context(self.precision, batch.device.type):
            out = predict_fn(batch)  # (B, K, h, w)
        self.num_predict_calls += 1
        if out.dim() != 4 or out.shape[0] != batch.shape[0] or out.shape[-2:] != batch.shape[-2:]:
            raise ValueError(
                f"predict_fn returned shape {tuple(out.shape)} for input {tuple(batch.shape)}; "
                "expected (B, K, h, w) at the input size"
            )
        return out.float()


def _pair(value, name: str) -> tuple[int, int]:
    vals = [int(v) for v in (value if isinstance(value, (list, tuple)) else (value, value))]
    if len(vals) != 2 or min(vals) <= 0:
        raise ValueError(f"{name} must be two positive integers (H, W), got {value}")
    return vals[0], vals[1]


def upsample_probs(probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (K, h, w) probabilities to (K, H, W) bilinearly (for callers that resized input)."""
    if tuple(probs.shape[-2:]) == tuple(size):
        return probs
    return F.interpolate(probs[None], size=size, mode="bilinear", align_corners=False)[0]


class SegmentorWithInference(nn.Module):
    """A built SegCLIP model run through a :class:`SegInferencer` (windows, TTA, precision).

    ``forward`` takes and returns what the model takes and returns in evaluation (mapper dicts ->
    ``[{"sem_seg": (K, height, width)}]``), so detectron2's evaluation loop runs it unchanged.
    """

    def __init__(self, model: nn.Module, inferencer: SegInferencer):
        super().__init__()
        self.model = model
        self.inferencer = inferencer

    @property
    def device(self) -> torch.device:
        return self.model.device

    def forward(self, batched_inputs: list[dict]) -> list[dict]:
        results = []
        for x in batched_inputs:
            image = x["image"].to(self.device).float()  # (3, H, W)
            probs = self.inferencer(self.model.predict_sem_seg_probs, image)  # (K, H, W)
            size = (int(x.get("height", image.shape[1])), int(x.get("width", image.shape[2])))
            results.append({"sem_seg": upsample_probs(probs, size)})
        return results
