"""Execution strategies for inference, applied to a built, loaded, eval-mode model.

The modules in ``segclip_d2.modeling`` hold the method only. :func:`optimize_for_inference` makes
the same computation run faster; every transform changes results by float rounding at most
(``tests/test_optimize.py`` checks each one against the plain model):

* ``fold_frozen_bn``: ``FrozenBatchNorm2d`` folded into the convolution before it (one pass per
  backbone activation less; :mod:`segclip_d2.predict.frozen_bn_folding`).
* ``channels_last_input`` (CPU): the backbone's input in canonical channels-last layout; oneDNN
  convolutions are ~1.5x faster on it, and the layout carries through the network.
* ``cpu_kernels`` (CPU): inside the pixel decoder and the transformer decoder, float32
  ``F.linear`` goes through oneDNN's linear primitive (:mod:`segclip_d2.predict.onednn_linear`;
  ``SEGCLIP_ONEDNN_LINEAR=0`` turns this off) and softmax over short rows (the deformable
  attention's L * P = 12 weights) is computed as exp(x - max) / sum, ~5x faster than
  ``Tensor.softmax`` there.
* ``chunked_encoder``: each deformable-attention encoder layer projects its values once, then
  runs attention, norms and FFN over ``chunk_tokens`` tokens at a time (the activations stay in
  cache; ~1/3 faster per layer at 21,504 tokens) with bf16 values kept as the compiled CPU
  kernel reads them, or converted to float32 once for all chunks otherwise.
* ``decoder_masks``: in the transformer decoder, the intermediate predictions (which only give
  the next layer's cross-attention mask) compute mask logits on the attention map itself, from
  the mask features resized to it (bilinear resizing is linear per channel, so this equals
  resizing the stride-4 mask logits, at 1/4 to 1/64 of the cost) and skip the class head; even
  integer reductions of 4 or more resize by averaging four strided slices (what
  ``F.interpolate`` computes there); channels-last mask features are read in place by one
  batched matmul (einsum copies them to NCHW first: ~3x slower in bf16 at 256 x 256 x 256).
* ``cast_memory_once`` (reduced precision): under autocast the decoder's memory values and keys
  are cast to the compute dtype once per forward instead of once per layer that reads them.

The model keeps its parameters, ``state_dict`` keys and class; the transforms replace submodules
by wrappers that share their children, swap in subclasses with the same state, or install forward
hooks. Training never calls this (CPU training takes :func:`channels_last_input` alone);
evaluation during training optimises a copy (:func:`inference_copy`).
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from segclip_d2.layers.ms_deform_attn import compiled_reads_bf16
from segclip_d2.predict import onednn_linear
from segclip_d2.predict.frozen_bn_folding import enable_frozen_bn_folding

from .precision import effective_precision

logger = logging.getLogger(__name__)

# Tokens per step of the chunked encoder layers.
CHUNK_TOKENS = 2048
# Rows up to this length take the short-row softmax.
SHORT_SOFTMAX_ROW = 32

TRANSFORMS = (
    "fold_frozen_bn",
    "channels_last_input",
    "cpu_kernels",
    "chunked_encoder",
    "decoder_masks",
    "cast_memory_once",
)
_MARK = "_segclip_inference_transforms"


def optimize_for_inference(
    model: nn.Module,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    transforms: tuple[str, ...] | None = None,
) -> nn.Module:
    """Apply the execution strategies of the module docstring to ``model`` (in place).

    Args:
        model: a built SegCLIP meta-architecture with its weights loaded, in eval mode.
        device: where it will run (moved there); default: where it is.
        precision: "fp32", "bf16" or "fp16" (``TEST.PRECISION``); "cast_memory_once" is only
            installed for reduced precision.
        transforms: a subset of :data:`TRANSFORMS` (default: all that apply to the device).
    Returns:
        ``model``, with ``optimized_transforms(model)`` listing what was applied.
    """
    if model.training:
        raise ValueError("optimize_for_inference() needs an eval-mode model: call model.eval()")
    if getattr(model, _MARK, None) is not None:
        return model  # already optimised
    unknown = set(transforms or ()) - set(TRANSFORMS)
    if unknown:
        raise ValueError(f"unknown transforms {sorted(unknown)}; choose from {TRANSFORMS}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    cpu = device.type == "cpu"
    low = effective_precision(precision, device.type) != "fp32"
    wanted = set(TRANSFORMS if transforms is None else transforms)
    applied = []
    if "fold_frozen_bn" in wanted and enable_frozen_bn_folding(model.backbone):
        applied.append("fold_frozen_bn")
    if "channels_last_input" in wanted and cpu:
        channels_last_input(model)
        applied.append("channels_last_input")
    if "cpu_kernels" in wanted and cpu:
        for part in (model.pixel_decoder, model.transformer_decoder):
            install_cpu_kernels(part)
        applied.append("cpu_kernels")
    if "chunked_encoder" in wanted and chunk_encoder_layers(model.pixel_decoder):
        applied.append("chunked_encoder")
    if "decoder_masks" in wanted:
        fast_decoder_masks(model.transformer_decoder)
        applied.append("decoder_masks")
    if "cast_memory_once" in wanted and low and cast_memory_once(model.transformer_decoder):
        applied.append("cast_memory_once")
    setattr(model, _MARK, tuple(applied))
    logger.info("optimize_for_inference(%s, %s): %s", device, precision, ", ".join(applied))
    return model


def optimized_transforms(model: nn.Module) -> tuple[str, ...] | None:
    """The transforms :func:`optimize_for_inference` applied to ``model``, or None."""
    return getattr(model, _MARK, None)


def inference_copy(model: nn.Module, device=None, precision: str = "fp32") -> nn.Module:
    """An optimised eval-mode copy of ``model`` (unwrapped from DDP); ``model`` is untouched.
    Returns ``model`` itself when it is already optimised."""
    model = model.module if hasattr(model, "module") else model
    if optimized_transforms(model) is not None:
        return model
    return optimize_for_inference(copy.deepcopy(model).eval(), device, precision)


# ---------------------------------------------------------------------- channels-last input
def canonical_channels_last(images: torch.Tensor) -> torch.Tensor:
    """``images`` in channels-last layout with canonical strides.

    A batch made from an HWC array by ``permute(2, 0, 1)[None]`` already counts as channels-last
    contiguous, but its batch stride is 3 instead of 3*H*W, and oneDNN then falls back to NCHW
    for the whole backbone (ResNet-50 at 1024: ~1.4x slower). Such tensors are copied once.
    """
    b, c, h, w = images.shape
    if images.stride() != (c * h * w, 1, w * c, c):
        images = images.clone(memory_format=torch.channels_last)
    return images


def channels_last_input(model: nn.Module) -> None:
    """Give ``model.backbone`` its CPU input in canonical channels-last layout (a forward
    pre-hook; parameters keep their layout, which DDP's gradient buckets rely on). The one
    transform that training uses too: a CPU training step of the ``make train`` model (batch 8
    of 256 px) takes 0.89-0.94x the time with it."""
    if _channels_last_hook not in model.backbone._forward_pre_hooks.values():
        model.backbone.register_forward_pre_hook(_channels_last_hook)


def _channels_last_hook(module, args):
    images = args[0]
    if images.device.type != "cpu" or images.dim() != 4:
        return None
    return (canonical_channels_last(images), *args[1:])


# ---------------------------------------------------------------------- CPU kernels
_SOFTMAX = {torch.Tensor.softmax, F.softmax, torch.softmax}


def short_row_softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension as exp(x - max) / sum, in float32 for reduced-precision
    ``x`` (result in ``x``'s dtype). For rows of a dozen values on CPU this is ~5x faster than
    ``Tensor.softmax``, whose kernel vectorises along the row."""
    y = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    y = y - y.amax(-1, keepdim=True)
    y = y.exp_()
    y = y.div_(y.sum(-1, keepdim=True))
    return y.to(x.dtype)


def _softmax_dim(func, args, kwargs):
    """The dim of a softmax call that the short-row kernel handles, else None."""
    x = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    if kwargs.get("dtype") is not None or len(args) > 2 or not isinstance(x, torch.Tensor):
        return None
    if dim is None or x.dim() == 0 or dim not in (-1, x.dim() - 1):
        return None
    if x.device.type != "cpu" or not x.is_floating_point() or x.shape[-1] > SHORT_SOFTMAX_ROW:
        return None
    return dim


class CpuKernelMode(TorchFunctionMode):
    """Inside a module's forward without autograd: ``F.linear`` through oneDNN (when
    :func:`~segclip_d2.predict.onednn_linear.uses_onednn` allows) and short-row softmax."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_grad_enabled():
            if func is F.linear:
                return onednn_linear.linear(*args, **kwargs)
            if func in _SOFTMAX and _softmax_dim(func, args, kwargs) is not None:
                return short_row_softmax(args[0])
        return func(*args, **kwargs)


def install_cpu_kernels(module: nn.Module) -> None:
    """Run ``module``'s forward inside :class:`CpuKernelMode` (forward hooks)."""
    active = []

    def enter(mod, args):
        mode = CpuKernelMode()
        mode.__enter__()
        active.append(mode)

    def leave(mod, args, output):
        active.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)


# ---------------------------------------------------------------------- chunked encoder
class ChunkedEncoderLayer(nn.Module):
    """A deformable-attention encoder layer run ``chunk_tokens`` tokens at a time without
    autograd. Registers the plain layer's children as its own, so parameters and ``state_dict``
    keys are those of the plain layer."""

    def __init__(self, layer: nn.Module, chunk_tokens: int):
        super().__init__()
        for name, child in layer.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "plain", layer)  # not a child: no duplicate keys
        self.chunk_tokens = int(chunk_tokens)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index):
        layer = self.plain
        if torch.is_grad_enabled():
            return layer(src, pos, reference_points, spatial_shapes, level_start_index)
        attn = layer.self_attn
        value = attn.project_value(src, spatial_shapes)
        if value.dtype in (torch.float16, torch.bfloat16) and not (
            attn.impl != "pytorch" and compiled_reads_bf16(value)
        ):
            value = value.float()  # once, instead of once per chunk inside the op wrapper
        args = (value, spatial_shapes, level_start_index)
        out = None
        for i in range(0, src.shape[1], self.chunk_tokens):
            sl = slice(i, i + self.chunk_tokens)
            y = layer.attend_and_ffn(src[:, sl], pos[:, sl], reference_points[:, sl], *args)
            if out is None:
                out = y.new_empty(src.shape[:2] + y.shape[2:])
            out[:, sl] = y
        return out


def chunk_encoder_layers(pixel_decoder: nn.Module, chunk_tokens: int | None = None) -> int:
    """Replace every deformable-attention encoder layer by a :class:`ChunkedEncoderLayer` of
    ``chunk_tokens`` tokens (default :data:`CHUNK_TOKENS`); returns how many."""
    from segclip_d2.modeling.pixel_decoder.msdeformattn import MSDeformAttnEncoderLayer

    chunk_tokens = CHUNK_TOKENS if chunk_tokens is None else chunk_tokens
    count = 0
    for mod in pixel_decoder.modules():
        if isinstance(mod, nn.ModuleList):
            for i, layer in enumerate(mod):
                if type(layer) is MSDeformAttnEncoderLayer:
                    mod[i] = ChunkedEncoderLayer(layer, chunk_tokens)
                    count += 1
    return count


# ---------------------------------------------------------------------- decoder masks
def mask_logits(mask_embed: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """einsum("bqc,bchw->bqhw"): (B, Q, C) embeddings x (B, C, H, W) features -> (B, Q, H, W).

    Channels-last features are a (B, H*W, C) matrix in memory; one batched matmul against its
    transpose reads them in place, where einsum first copies them to NCHW. Same values.
    """
    b, c, h, w = features.shape
    if features.is_contiguous(memory_format=torch.channels_last):
        flat = features.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view
        return torch.bmm(mask_embed, flat.transpose(1, 2)).view(b, -1, h, w)
    return torch.einsum("bqc,bchw->bqhw", mask_embed, features)


def bilinear_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)``, computed by strided
    slices (same values up to float rounding) for even integer reductions of 4 or more.

    Reducing by an even factor f samples at f*i + f/2 - 1/2, midway between two pixels in each
    axis, so the result is the mean of four strided slices.
    """
    h, w = x.shape[-2:]
    oh, ow = int(size[0]), int(size[1])
    fy, fx = h // oh, w // ow
    if h != fy * oh or w != fx * ow or fy != fx or fy < 4 or fy % 2:
        return F.interpolate(x, size=(oh, ow), mode="bilinear", align_corners=False)
    o = fy // 2 - 1
    s = (
        x[..., o::fy, o::fy]
        + x[..., o + 1 :: fy, o::fy]
        + x[..., o::fy, o + 1 :: fy]
        + x[..., o + 1 :: fy, o + 1 :: fy]
    )
    return s * 0.25


class FastDecoderMasks:
    """Mixed into a transformer decoder's class by :func:`fast_decoder_masks`: without autograd
    in eval mode, the intermediate predictions compute the attention masks only, at the
    attention map's size (see the module docstring); the last prediction is the plain one (with
    :func:`mask_logits`)."""

    def layer_loop(self, groups, memory, mask_features, text_embeddings):
        if self.training or torch.is_grad_enabled():
            return super().layer_loop(groups, memory, mask_features, text_embeddings)
        self._resized_features = {}  # (h, w) -> mask features resized to it, this forward only
        try:
            return super().layer_loop(groups, memory, mask_features, text_embeddings)
        finally:
            self._resized_features = None

    def predict_then_mask(self, queries, layer, groups, memory, mask_features, text, predictions):
        resized = getattr(self, "_resized_features", None)
        if resized is None or layer == self.num_layers:
            return super().predict_then_mask(
                queries, layer, groups, memory, mask_features, text, predictions
            )
        nxt = layer % self.num_feature_levels
        size = memory.sizes[nxt]
        if size not in resized:
            resized[size] = bilinear_resize(mask_features, size)
        masks = mask_logits(self.mask_embed(self.decoder_norm(queries)), resized[size])
        blocked = groups.extra_blocked[nxt] if groups.extra_blocked else None
        return self.cross_attn_mask(masks, size, blocked)

    def predict(self, queries, mask_features, text_embeddings):
        if torch.is_grad_enabled():
            return super().predict(queries, mask_features, text_embeddings)
        x = self.decoder_norm(queries)
        logits = self.class_head(x, text_embeddings)
        return logits, mask_logits(self.mask_embed(x), mask_features)


_FAST_CLASSES: dict[type, type] = {}


def fast_decoder_masks(decoder: nn.Module) -> None:
    """Give ``decoder`` (a ``MaskedAttentionDecoder``) the :class:`FastDecoderMasks` forward: an
    in-place class change to a subclass of its own class (same attributes and state)."""
    cls = type(decoder)
    if issubclass(cls, FastDecoderMasks):
        return
    if cls not in _FAST_CLASSES:
        _FAST_CLASSES[cls] = type(f"FastMasks{cls.__name__}", (FastDecoderMasks, cls), {})
    decoder.__class__ = _FAST_CLASSES[cls]


# ---------------------------------------------------------------------- memory casts
def cast_memory_once(decoder: nn.Module) -> int:
    """Under autocast without autograd, give every cross-attention layer of ``decoder`` (the
    transformer decoder) its memory values and keys in the autocast dtype, cast once per
    forward (each layer's ``F.linear`` would cast its own copy: up to H/8 * W/8 tokens per
    layer). Same values: autocast casts the same tensors to the same dtype. Returns the number
    of layers hooked."""
    from segclip_d2.modeling.transformer_decoder.attention_layers import CrossAttentionLayer

    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        hit = cache.get(id(t))
        if hit is None or hit[0] is not t:
            hit = cache[id(t)] = (t, t.to(dtype))  # keeps t alive: its id stays unique
        return hit[1]

    def pre(mod, args, kwargs):
        key = kwargs.get("memory_with_pos")
        dev = args[0].device.type
        if key is None or len(args) < 2 or torch.is_grad_enabled():
            return None
        if not torch.is_autocast_enabled(dev):
            return None
        low = torch.get_autocast_dtype(dev)
        kwargs = dict(kwargs, memory_with_pos=cast(key, low))
        return (args[0], cast(args[1], low), *args[2:]), kwargs

    count = 0
    for mod in decoder.modules():
        if isinstance(mod, CrossAttentionLayer):
            mod.register_forward_pre_hook(pre, with_kwargs=True)
            count += 1
    if count:
        decoder.register_forward_pre_hook(lambda m, a: cache.clear())
        decoder.register_forward_hook(lambda m, a, o: cache.clear(), always_call=True)
    return count


__all__ = [
    "CHUNK_TOKENS",
    "TRANSFORMS",
    "ChunkedEncoderLayer",
    "CpuKernelMode",
    "FastDecoderMasks",
    "bilinear_resize",
    "canonical_channels_last",
    "cast_memory_once",
    "channels_last_input",
    "chunk_encoder_layers",
    "fast_decoder_masks",
    "inference_copy",
    "mask_logits",
    "install_cpu_kernels",
    "optimize_for_inference",
    "optimized_transforms",
    "short_row_softmax",
]
