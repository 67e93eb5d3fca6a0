"""``SegInferencer``: whole-image or sliding-window inference, optional TTA and reduced precision,
around any ``predict_fn(images (B, 3, h, w)) -> (B, K, h, w)`` class-probability function."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable

from .precision import autocast_context, check_precision
from .slide import BLENDS, slide_inference
from .tta import View, build_views

logger = logging.getLogger(__name__)

# predict_fn(images (B, 3, h, w) float RGB 0..255) -> (B, K, h, w) class probabilities
PredictFn = Callable[[torch.Tensor], torch.Tensor]

MODES = ("whole", "slide")


class SegInferencer:
    """Turns a batch-level class-probability function into full-image inference.

    ``__call__(predict_fn, image (3, H, W)) -> (K, H, W)`` float32 probabilities. Every batch given
    to ``predict_fn`` is padded bottom/right to a multiple of ``size_divisibility`` with
    ``pad_value`` (the pixel mean, so padding is zero after normalisation) and its output cropped
    back. ``mode="slide"`` runs windows of ``crop_size`` every ``stride`` pixels, ``batch_size``
    at a time, blending overlaps with a taper (``blend``); windows shrink to the image where it
    is smaller than the crop, so a crop covering the image gives exactly the whole-image result.
    With ``tta_enabled`` every view of :func:`~segclip_d2.inference.tta.build_views` goes
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
        size_divisibility: int = 32,
        pad_value: Sequence[float] = (0.0, 0.0, 0.0),
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
        self.size_divisibility = int(size_divisibility)
        self.pad_value = tuple(float(v) for v in pad_value)
        if len(self.pad_value) != 3:
            raise ValueError(f"pad_value needs 3 channel values, got {pad_value}")
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
            "size_divisibility": cfg.MODEL.SEGCLIP.SIZE_DIVISIBILITY,
            "pad_value": tuple(cfg.MODEL.PIXEL_MEAN),
        }

    def __repr__(self) -> str:
        extra = (
            f", crop={self.crop_size}, stride={self.stride}, blend={self.blend}"
            if self.mode == "slide"
            else ""
        )
        return (
            f"SegInferencer(mode={self.mode}{extra}, views={len(self.views)}, "
            f"precision={self.precision}, size_divisibility={self.size_divisibility})"
        )

    # ------------------------------------------------------------------ running
    def __call__(self, predict_fn: PredictFn, image: torch.Tensor) -> torch.Tensor:
        """Class probabilities (K, H, W) float32 of ``image`` (3, H, W), RGB 0..255."""
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected an image of shape (3, H, W), got {tuple(image.shape)}")
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
        """Pad (B, 3, h, w) to the size divisibility, predict at the configured precision, crop
        back -> (B, K, h, w) float32."""
        b, _, h, w = batch.shape
        padded = self._pad(batch)
        with autocast_context(self.precision, batch.device.type):
            out = predict_fn(padded)  # (B, K, h', w')
        self.num_predict_calls += 1
        if out.dim() != 4 or out.shape[0] != b or tuple(out.shape[-2:]) != tuple(padded.shape[-2:]):
            raise ValueError(
                f"predict_fn returned shape {tuple(out.shape)} for input {tuple(padded.shape)}; "
                "expected (B, K, h, w) at the input size"
            )
        return out[:, :, :h, :w].float()

    def _pad(self, batch: torch.Tensor) -> torch.Tensor:
        d = self.size_divisibility
        h, w = batch.shape[-2:]
        if d <= 1 or (h % d == 0 and w % d == 0):
            return batch
        ph, pw = -(-h // d) * d, -(-w // d) * d
        fill = torch.tensor(self.pad_value, dtype=batch.dtype, device=batch.device)
        out = fill.view(1, 3, 1, 1).expand(batch.shape[0], 3, ph, pw).clone()
        out[:, :, :h, :w] = batch
        return out


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
