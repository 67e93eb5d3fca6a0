"""Poly learning-rate schedule with warmup (Mask2Former's ``WarmupPolyLR``; detectron2 0.5 has
no poly schedule in core)."""

from __future__ import annotations

import logging

import torch
from detectron2.solver import build_lr_scheduler as d2_build_lr_scheduler

logger = logging.getLogger(__name__)


def warmup_factor_at_iter(method: str, it: int, warmup_iters: int, warmup_factor: float) -> float:
    """LR multiplier during warmup: "constant" or "linear" from ``warmup_factor`` up to 1."""
    if it >= warmup_iters:
        return 1.0
    if method == "constant":
        return warmup_factor
    if method == "linear":
        alpha = it / warmup_iters
        return warmup_factor * (1 - alpha) + alpha
    raise ValueError(f"unknown warmup method {method!r} (use 'linear' or 'constant')")


class WarmupPolyLR(torch.optim.lr_scheduler._LRScheduler):
    """``lr = base_lr * warmup(it) * (1 - it / max_iters) ** power``, stepped once per iteration.

    Args:
        max_iters: total iterations (the LR reaches 0 there).
        warmup_factor, warmup_iters, warmup_method: linear or constant warmup.
        power: poly exponent (0.9 in Mask2Former).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_iters: int,
        warmup_factor: float = 0.001,
        warmup_iters: int = 1000,
        warmup_method: str = "linear",
        power: float = 0.9,
        last_epoch: int = -1,
    ):
        if max_iters <= 0:
            raise ValueError(f"max_iters must be positive, got {max_iters}")
        self.max_iters = max_iters
        self.warmup_factor = warmup_factor
        self.warmup_iters = warmup_iters
        self.warmup_method = warmup_method
        self.power = power
        super().__init__(optimizer, last_epoch)

    def _factor(self, it: int) -> float:
        warm = warmup_factor_at_iter(self.warmup_method, it, self.warmup_iters, self.warmup_factor)
        progress = min(max(it, 0), self.max_iters) / self.max_iters
        return warm * (1.0 - progress) ** self.power

    def get_lr(self) -> list[float]:
        factor = self._factor(self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()


def build_lr_scheduler(cfg, optimizer: torch.optim.Optimizer):
    """``SOLVER.LR_SCHEDULER_NAME`` "WarmupPolyLR" (``POLY_LR_POWER``) or any of detectron2's."""
    name = cfg.SOLVER.LR_SCHEDULER_NAME
    if name == "WarmupPolyLR":
        return WarmupPolyLR(
            optimizer,
            cfg.SOLVER.MAX_ITER,
            warmup_factor=cfg.SOLVER.WARMUP_FACTOR,
            warmup_iters=cfg.SOLVER.WARMUP_ITERS,
            warmup_method=cfg.SOLVER.WARMUP_METHOD,
            power=cfg.SOLVER.POLY_LR_POWER,
        )
    return d2_build_lr_scheduler(cfg, optimizer)
