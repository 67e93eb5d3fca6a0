"""One training step: forward, backward, full-model gradient clipping, optional AMP.

Replaces detectron2's ``SimpleTrainer.run_step`` / ``AMPTrainer`` (0.5's asserts CUDA): fp16
autocast comes with a ``GradScaler`` (on CUDA, and on CPU where tests exercise the CUDA AMP path);
bf16 autocast needs no scaler. Steps the scaler skips (inf/NaN gradients) are counted in
``skipped_steps`` and logged as ``amp_skipped_steps``.
With ``seed >= 0`` torch's RNG is re-seeded from (seed, iteration, rank) before every forward,
so the point sampling of the losses does not depend on what ran before (resuming gives the
same run).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from detectron2.engine import SimpleTrainer
from detectron2.utils import comm

logger = logging.getLogger(__name__)


def step_seed(seed: int, iteration: int, rank: int) -> int:
    return (seed * 999_983 + iteration * 104_729 + rank * 7_727 + 1) % (2**31 - 1)


class SegCLIPTrainLoop(SimpleTrainer):
    """``SimpleTrainer`` with gradient clipping, AMP on CPU or CUDA and per-step seeding.

    Args:
        model, data_loader, optimizer: as for ``SimpleTrainer``.
        grad_clipper: called with the model's parameters after backward (or None).
        amp_dtype: autocast dtype (``torch.float16`` / ``torch.bfloat16``) or None for fp32.
        seed: per-step seed base; < 0 leaves torch's RNG alone.
    """

    def __init__(
        self,
        model,
        data_loader,
        optimizer,
        *,
        grad_clipper: Callable | None = None,
        amp_dtype: torch.dtype | None = None,
        seed: int = -1,
    ):
        super().__init__(model, data_loader, optimizer)
        self.grad_clipper = grad_clipper
        self.amp_dtype = amp_dtype
        self.seed = seed
        params = list(model.parameters())
        self.device_type = params[0].device.type if params else "cpu"
        self.grad_scaler = None
        self.skipped_steps = 0
        if amp_dtype == torch.float16:  # CUDA AMP, or CPU fp16 autocast (exercises that path)
            self.grad_scaler = torch.amp.GradScaler(self.device_type)

    def run_step(self):
        assert self.model.training, "[SegCLIPTrainLoop] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        if self.seed >= 0:
            torch.manual_seed(step_seed(self.seed, self.iter, comm.get_rank()))

        with torch.autocast(
            self.device_type, dtype=self.amp_dtype or torch.float32, enabled=bool(self.amp_dtype)
        ):
            loss_dict = self.model(data)
        if isinstance(loss_dict, torch.Tensor):
            loss_dict = {"total_loss": loss_dict}
        losses = sum(v.float() for v in loss_dict.values())

        self.optimizer.zero_grad()
        if self.grad_scaler is not None:
            self.grad_scaler.scale(losses).backward()
            self.grad_scaler.unscale_(self.optimizer)
        else:
            losses.backward()
        if self.grad_clipper is not None:
            self.grad_clipper(self.model.parameters())

        self._write_metrics(loss_dict, data_time)

        if self.grad_scaler is not None:
            scale = self.grad_scaler.get_scale()
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
            if self.grad_scaler.get_scale() < scale:  # inf/NaN gradients: the step was skipped
                self.skipped_steps += 1
            self.storage.put_scalar("amp_skipped_steps", self.skipped_steps, smoothing_hint=False)
        else:
            self.optimizer.step()

    def state_dict(self):
        ret = super().state_dict()
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
