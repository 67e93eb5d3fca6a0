"""Optimizer and gradient clipping from ``SOLVER.*`` (Mask2Former's recipe).

Parameter groups: the backbone's LR is ``BASE_LR * BACKBONE_MULTIPLIER``; normalisation layers
get ``WEIGHT_DECAY_NORM``; embeddings (every ``nn.Embedding``: query, context and level
embeddings, and parameters named like embeddings: ``level_embed``, ``void_embed``,
``*pos_embed*``, ``positional_embedding``, plus the learnable ``logit_scale`` temperature) get
``WEIGHT_DECAY_EMBED``; everything else ``WEIGHT_DECAY``. Frozen parameters (the CLIP text
encoder) are left out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn

logger = logging.getLogger(__name__)

NORM_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


def is_norm_module(module: nn.Module) -> bool:
    """torch's norm layers and any class named like one (detectron2's ``LayerNorm``, ...)."""
    return isinstance(module, NORM_TYPES) or type(module).__name__.lower().endswith("norm")


def is_embedding_param(module: nn.Module, param_name: str) -> bool:
    """Embeddings: ``nn.Embedding`` weights and parameters named like embeddings."""
    if isinstance(module, nn.Embedding):
        return True
    name = param_name.lower()
    return (
        name.endswith("_embed")
        or "pos_embed" in name
        or "positional_embedding" in name
        or name == "logit_scale"
    )


def get_param_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: float,
    weight_decay_embed: float,
    backbone_multiplier: float,
    backbone_prefix: str = "backbone.",
) -> list[dict]:
    """One group per trainable parameter with its own ``lr`` and ``weight_decay``."""
    groups = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            lr = base_lr
            if full_name.startswith(backbone_prefix) or f".{backbone_prefix}" in full_name:
                lr = base_lr * backbone_multiplier
            wd = weight_decay
            if is_norm_module(module):
                wd = weight_decay_norm
            elif is_embedding_param(module, param_name):
                wd = weight_decay_embed
            groups.append({"params": [param], "lr": lr, "weight_decay": wd, "name": full_name})
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (``SOLVER.OPTIMIZER: ADAMW``) or SGD with the parameter groups above."""
    s = cfg.SOLVER
    groups = get_param_groups(
        model,
        base_lr=s.BASE_LR,
        weight_decay=s.WEIGHT_DECAY,
        weight_decay_norm=s.WEIGHT_DECAY_NORM,
        weight_decay_embed=s.WEIGHT_DECAY_EMBED,
        backbone_multiplier=s.BACKBONE_MULTIPLIER,
    )
    name = s.OPTIMIZER.upper()
    if name == "ADAMW":
        optimizer = torch.optim.AdamW(groups, lr=s.BASE_LR)
    elif name == "SGD":
        optimizer = torch.optim.SGD(groups, lr=s.BASE_LR, momentum=s.MOMENTUM, nesterov=s.NESTEROV)
    else:
        raise ValueError(f"SOLVER.OPTIMIZER {s.OPTIMIZER!r} is not supported (ADAMW or SGD)")
    num_backbone = sum(1 for g in groups if g["lr"] != s.BASE_LR)
    logger.info(
        f"{name}: {len(groups)} trainable tensors ({num_backbone} in the backbone at "
        f"lr x {s.BACKBONE_MULTIPLIER})"
    )
    return optimizer


def build_gradient_clipper(cfg) -> Callable[[Iterable[torch.Tensor]], torch.Tensor | None] | None:
    """``SOLVER.CLIP_GRADIENTS``: "full_model" clips the total norm over all parameters at
    ``CLIP_VALUE`` (Mask2Former: 0.01); "norm"/"value" clip each parameter separately
    (detectron2's meaning). Returns a function of the parameters, or None when disabled."""
    cc = cfg.SOLVER.CLIP_GRADIENTS
    if not cc.ENABLED:
        return None
    clip_type, value, norm_type = cc.CLIP_TYPE, float(cc.CLIP_VALUE), float(cc.NORM_TYPE)

    def clip_full_model(params):
        params = [p for p in params if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, value, norm_type=norm_type)

    def clip_each_norm(params):
        for p in params:
            if p.grad is not None:
                torch.nn.utils.clip_grad_norm_([p], value, norm_type=norm_type)
        return None

    def clip_each_value(params):
        for p in params:
            if p.grad is not None:
                torch.nn.utils.clip_grad_value_([p], value)
        return None

    clippers = {"full_model": clip_full_model, "norm": clip_each_norm, "value": clip_each_value}
    if clip_type not in clippers:
        raise ValueError(
            f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE {clip_type!r}: use one of {sorted(clippers)}"
        )
    return clippers[clip_type]
