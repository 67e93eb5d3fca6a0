"""Pretrained RGB kernels for a model of other input bands: the one widening rule.

Used where RGB weights meet an N-band model: the CLIP ResNet backbone widens its pretrained
stem when it is built (:func:`segclip_d2.modeling.backbone.clip_resnet.widen_first_conv`), and
training widens the first convolution of ``MODEL.WEIGHTS`` (an ImageNet ``.pkl`` for detectron2's
ResNet, or an RGB SegCLIP checkpoint to fine-tune on more bands) when it loads it
(:func:`widen_checkpoint_inputs`). Both take the RGB kernels in R, G, B order, the project's
channel order (``INPUT.FORMAT`` is RGB).

The rule, per output channel ``o`` (``W_c`` is the pretrained kernel of colour ``c``):

* a band named ``red``, ``green`` or ``blue`` gets that colour's kernel unchanged. So on the
  visible bands, with every other band zero (its mean, after normalisation), the widened
  convolution gives exactly the RGB one's output: the pretrained model is kept as it was;
* every other band gets the mean kernel ``M = (W_r + W_g + W_b) / 3`` scaled by
  ``s_o = sqrt(mean_c |W_c[o]|^2) / |M[o]|``, capped at ``sqrt(3)``. For a band of zero-mean,
  unit-variance, uncorrelated pixels the expected squared response of a kernel ``K`` is
  ``|K|^2``, so a new band's activations get the size of a visible band's: averaging kernels
  that partly cancel (colour-opponent filters) shrinks ``|M|`` and ``s_o`` undoes that. The cap
  is ``s_o`` of three orthogonal kernels of equal norm; kernels that cancel more than that
  (``M`` is then mostly noise) are not blown up beyond it.

The sum of the activations is not kept (impossible while the RGB output is kept exactly): a new
band that carries signal adds to it, as a fourth colour would. Without any of red, green and blue
in the bands, every band gets the scaled mean kernel.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from segclip_d2.utils.bands import RGB_NAMES, check_band_names

__all__ = ["MAX_NEW_BAND_GAIN", "widen_checkpoint_inputs", "widen_rgb_kernels"]

logger = logging.getLogger(__name__)

# Largest gain of a new band's kernel over the mean RGB kernel: the gain of three orthogonal
# kernels of equal norm (see the module doc).
MAX_NEW_BAND_GAIN = 3**0.5


@torch.no_grad()
def widen_rgb_kernels(weight: torch.Tensor, bands: Sequence[str]) -> torch.Tensor:
    """``(O, 3, k, k)`` RGB kernels -> ``(O, len(bands), k, k)`` by the module's rule."""
    names = check_band_names(bands, "INPUT.BANDS")
    if weight.dim() != 4 or weight.shape[1] != 3:
        raise ValueError(f"RGB kernels are (O, 3, k, k), got {tuple(weight.shape)}")
    w = weight.float()
    mean = w.mean(dim=1)  # (O, k, k)
    rms = w.pow(2).sum(dim=(2, 3)).mean(dim=1).sqrt()  # (O,)
    gain = (rms / mean.pow(2).sum(dim=(1, 2)).sqrt().clamp_min(1e-12)).clamp(max=MAX_NEW_BAND_GAIN)
    new = mean * gain[:, None, None]
    kernels = [w[:, RGB_NAMES.index(n)] if n in RGB_NAMES else new for n in names]
    return torch.stack(kernels, dim=1).to(weight.dtype)


def widen_checkpoint_inputs(
    checkpoint_model: dict, model_state: dict, bands: Sequence[str] | None, source: str = ""
) -> list[str]:
    """Widen, in place, the RGB input convolutions of a checkpoint's ``model`` dict for a model
    of ``bands``; returns the checkpoint keys widened.

    A checkpoint tensor ``(O, 3, k, k)`` is widened when the model has a parameter of the same
    name (or whose name ends with it: detectron2's ``.pkl`` keys lack the ``backbone.`` prefix)
    of shape ``(O, len(bands), k, k)``: only an input convolution takes 3 channels. Nothing
    happens for an RGB model (``bands`` None or red, green, blue), and a checkpoint that already
    fits is left as it is.
    """
    names = [str(b).strip().lower() for b in bands or RGB_NAMES]
    if tuple(names) == RGB_NAMES:
        return []
    widened = []
    for key, value in list(checkpoint_model.items()):
        shape = tuple(getattr(value, "shape", ()))
        if len(shape) != 4 or shape[1] != 3:
            continue
        target = (shape[0], len(names), *shape[2:])
        if not any(
            (mk == key or mk.endswith("." + key)) and tuple(mv.shape) == target
            for mk, mv in model_state.items()
        ):
            continue
        tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
        checkpoint_model[key] = widen_rgb_kernels(tensor, names)
        widened.append(key)
    if widened:
        logger.info(
            "%s: %s widened from RGB to the bands %s (red/green/blue kernels kept, the other "
            "bands from their scaled mean; segclip_d2.checkpoint.widen)",
            source or "checkpoint",
            ", ".join(widened),
            names,
        )
    return widened
