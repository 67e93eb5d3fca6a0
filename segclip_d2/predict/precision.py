"""Reduced-precision inference: one place that turns ``TEST.PRECISION`` into an autocast context.

``auto`` (the default) picks what is fast on the device: on CUDA bf16 where the GPU supports it,
else fp16; on CPU bf16 where the CPU computes it natively (AVX512-BF16 or AMX, see
:func:`segclip_d2.utils.hardware.cpu_has_native_bf16`), else fp32. ``fp32`` runs as is. ``bf16``
uses ``torch.autocast`` on CPU and GPU; on a CPU without native bf16 it warns (it is then many
times slower than fp32). ``fp16`` is for GPUs; on CPU it falls back to ``bf16`` with a warning
(CPU float16 autocast is slower than bfloat16 and loses more range). Numerically sensitive parts
stay in float32 inside the model: the deformable attention op and the final class x mask
combination / softmax / sigmoid run on float32 tensors (the model casts them), and every
probability returned by :class:`SegInferencer` is float32.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from ..utils.hardware import EMULATED_BF16_SLOWDOWN, native_bf16_reason

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_logged: set[str] = set()


def _once(level: int, message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.log(level, message)


def check_precision(precision: str) -> str:
    """Validate a precision name; returns it lower-cased."""
    p = str(precision).lower()
    if p not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return p


def _cuda_auto() -> str:
    try:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    except (AssertionError, RuntimeError):
        return "fp16"


def effective_precision(precision: str, device_type: str) -> str:
    """The precision actually used on ``device_type`` ("cpu" or "cuda"); the choice and any
    fallback are logged once."""
    p = check_precision(precision)
    if device_type == "cuda":
        return _cuda_auto() if p == "auto" else p
    native, why = native_bf16_reason()
    if p == "auto":
        choice = "bf16" if native else "fp32"
        _once(
            logging.INFO,
            f"precision auto on CPU: {choice} ({'native' if native else 'no native'} bf16: {why})",
        )
        return choice
    if p == "fp16":
        _once(logging.WARNING, f"fp16 inference needs a GPU; falling back to bf16 on {device_type}")
        p = "bf16"
    if p == "bf16" and not native:
        _once(
            logging.WARNING,
            f"bf16 inference on a CPU without native bf16 ({why}): expect it to be about "
            f"{EMULATED_BF16_SLOWDOWN}x slower than fp32; --precision auto picks fp32 here",
        )
    return p


def autocast_context(precision: str, device_type: str):
    """A context manager running the model at ``precision`` on ``device_type``."""
    p = effective_precision(precision, device_type)
    if p == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=_DTYPES[p])
