"""Reduced-precision inference: one place that turns ``TEST.PRECISION`` into an autocast context.

``fp32`` runs as is. ``bf16`` uses ``torch.autocast`` on CPU and GPU. ``fp16`` is for GPUs; on CPU
it falls back to ``bf16`` with a warning (CPU float16 autocast is slower than bfloat16 and loses
more range). Numerically sensitive parts stay in float32 inside the model: the deformable
attention op and the final class x mask combination / softmax / sigmoid run on float32 tensors
(the model casts them), and every probability returned by :class:`SegInferencer` is float32.
"""

from __future__ import annotations

import contextlib
import logging

import torch

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_warned_fp16_cpu = False


def check_precision(precision: str) -> str:
    """Validate a precision name; returns it lower-cased."""
    p = str(precision).lower()
    if p not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return p


def effective_precision(precision: str, device_type: str) -> str:
    """The precision actually used on ``device_type`` ("cpu" or "cuda").

    fp16 on CPU becomes bf16 (logged once).
    """
    global _warned_fp16_cpu
    p = check_precision(precision)
    if p == "fp16" and device_type != "cuda":
        if not _warned_fp16_cpu:
            logger.warning(
                "fp16 inference needs a GPU; falling back to bf16 autocast on %s", device_type
            )
            _warned_fp16_cpu = True
        return "bf16"
    return p


def autocast_context(precision: str, device_type: str):
    """A context manager running the model at ``precision`` on ``device_type``."""
    p = effective_precision(precision, device_type)
    if p == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=_DTYPES[p])
