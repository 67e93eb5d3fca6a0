"""Training machinery: trainer, train loop, optimizer, poly LR, hooks, data loader, launcher."""

from .hooks import BestCheckpointer
from .launch import launch
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
    "launch",
    "write_color_prediction",
]
