"""Training machinery: trainer, train loop, optimizer, poly LR, hooks, data loader (the launcher
of every entry point is :mod:`segclip_d2.launch`)."""

from .hooks import BestCheckpointer
from .lr_scheduler import WarmupPolyLR, build_lr_scheduler
from .optimizer import build_gradient_clipper, build_optimizer
from .trainer import SegCLIPTrainer, write_color_prediction

__all__ = [
    "BestCheckpointer",
    "SegCLIPTrainer",
    "WarmupPolyLR",
    "build_gradient_clipper",
    "build_lr_scheduler",
    "build_optimizer",
    "write_color_prediction",
]
