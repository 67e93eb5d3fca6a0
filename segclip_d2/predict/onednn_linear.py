"""float32 linear layers through oneDNN at CPU inference.

PyTorch runs a float32 ``F.linear`` on the CPU as an MKL SGEMM, and bfloat16 ones through oneDNN.
MKL does not use AVX-512 on every CPU: on the AMD EPYC measured here a (2048 x 256) x (256 x 1024)
float32 product ran at ~230 GFLOPS through ``F.linear`` and at ~480 GFLOPS through oneDNN's
linear primitive (``torch.ops.mkldnn._linear_pointwise``, the op TorchInductor uses for its CPU
linear layers; ``tools/benchmark_inference.py --ab`` shows the effect on the whole model).

:func:`linear` takes that route only when nothing depends on the other one: no autograd, a CPU
float32 input and weight, CPU autocast off (under autocast ``F.linear`` runs in bf16 through
oneDNN already). Otherwise, or when this torch build has no oneDNN linear, it is ``F.linear``.
Results differ from ``F.linear`` by float32 rounding only (another summation order).

``segclip_d2.predict.optimize`` routes the ``F.linear`` calls of the pixel decoder and the
transformer decoder through :func:`linear` at inference; the model code itself calls ``F.linear``.
``SEGCLIP_ONEDNN_LINEAR=0`` in the environment turns the route off (``F.linear`` everywhere).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

_ENABLED = os.environ.get("SEGCLIP_ONEDNN_LINEAR", "1") not in ("0", "")
_SUPPORTED: bool | None = None  # probed on first use


def onednn_linear_supported() -> bool:
    """Whether this torch build runs oneDNN's linear op (probed once, on a tiny product)."""
    global _SUPPORTED
    if _SUPPORTED is None:
        _SUPPORTED = False
        if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
            try:
                with torch.no_grad():
                    x, w, b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5)
                    got = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
                    _SUPPORTED = bool(torch.allclose(got, F.linear(x, w, b), atol=1e-5))
            except RuntimeError as e:
                logger.info("oneDNN linear not usable (%s); using F.linear", e)
    return _SUPPORTED


def uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`linear` sends this product to oneDNN."""
    return (
        _ENABLED
        and not torch.is_grad_enabled()
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and not torch.is_autocast_enabled("cpu")
        and onednn_linear_supported()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """``F.linear(x, weight, bias)``, through oneDNN when :func:`uses_onednn` says so."""
    if uses_onednn(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


__all__ = [
    "linear",
    "onednn_linear_supported",
    "uses_onednn",
]
