"""Inference-time folding of ``FrozenBatchNorm2d`` into the convolution before it.

A frozen BatchNorm is a fixed per-channel affine map, so ``norm(conv(x; W, b))`` equals
``conv(x; W * s, (b - mean) * s + beta)`` with ``s = gamma / sqrt(var + eps)``. The folded
convolution skips one full read and write of every backbone activation (53 of them for a ResNet-50
at 1024 x 1024: ~0.1-0.2 s of a CPU forward).

Nothing in the model is rewritten: :func:`enable_frozen_bn_folding` gives every detectron2
``Conv2d`` whose ``norm`` is a ``FrozenBatchNorm2d`` a forward that uses folded weights only when
the module is in eval mode and autograd is off. Parameters, buffers, ``state_dict`` keys and the
training computation are unchanged. The folded tensors are cached on the module and recomputed
when any of the tensors they derive from is modified in place (optimizer step,
``load_state_dict``), moved, or cast.
"""

from __future__ import annotations

import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from torch import nn


def _tensor_key(t: torch.Tensor | None) -> tuple:
    if t is None:
        return (None,)
    return (t._version, t.data_ptr(), t.dtype, t.device)


class Conv2dFoldedFrozenBN(Conv2d):
    """A detectron2 ``Conv2d`` (conv -> norm -> activation) that, in eval mode without autograd,
    runs one convolution with its ``FrozenBatchNorm2d`` folded in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        if self.training or torch.is_grad_enabled() or not isinstance(norm, FrozenBatchNorm2d):
            return super().forward(x)
        weight, bias = self.folded_weight_and_bias()
        x = self._conv_forward(x, weight, bias)
        return self.activation(x) if self.activation is not None else x

    def folded_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W * s, (b - mean) * s + beta), cached until a source tensor changes."""
        norm = self.norm
        sources = (self.weight, self.bias, norm.weight, norm.bias)
        sources += (norm.running_mean, norm.running_var)
        key = tuple(_tensor_key(t) for t in sources) + (float(norm.eps),)
        cached = getattr(self, "_folded_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        with torch.no_grad():
            scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
            weight = self.weight * scale.view(-1, 1, 1, 1).to(self.weight.dtype)
            conv_bias = self.bias if self.bias is not None else torch.zeros_like(scale)
            bias = (conv_bias - norm.running_mean) * scale + norm.bias
            weight = weight.contiguous()
            bias = bias.to(self.weight.dtype)
        self._folded_cache = (key, weight, bias)
        return weight, bias


def enable_frozen_bn_folding(module: nn.Module) -> int:
    """Give every detectron2 ``Conv2d`` under ``module`` whose norm is a ``FrozenBatchNorm2d``
    the folding forward (an in-place class change; same attributes and state). Returns how many
    convolutions were changed."""
    count = 0
    for m in module.modules():
        if type(m) is Conv2d and isinstance(getattr(m, "norm", None), FrozenBatchNorm2d):
            m.__class__ = Conv2dFoldedFrozenBN
            count += 1
    return count


__all__ = ["Conv2dFoldedFrozenBN", "enable_frozen_bn_folding"]
