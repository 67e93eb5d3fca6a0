"""One training step: forward, backward, full-model gradient clipping, optional AMP, and the
checks that stop a diverged training.

Replaces detectron2's ``SimpleTrainer.run_step`` / ``AMPTrainer`` (0.5's asserts CUDA): fp16
autocast comes with a ``GradScaler`` (on CUDA, and on CPU where tests exercise the CUDA AMP path);
bf16 autocast needs no scaler. Steps the scaler skips (inf/NaN gradients) are normal under fp16:
they are counted in ``skipped_steps`` and logged as ``amp_skipped_steps``.

A diverged training stops with :class:`TrainingDiverged` (a user error: one line naming the
iteration and what to try) on a non-finite loss, on non-finite gradients without a scaler, or on
non-finite weights after a step, before any checkpoint holds them. Under several processes the
loss check is agreed on by all ranks (the gradients are already identical after DDP's all-reduce),
so every rank stops at the same step.

With ``seed >= 0`` torch's RNG is re-seeded from (seed, iteration, rank) before every forward,
so the point sampling of the losses does not depend on what ran before (resuming gives the
same run).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from detectron2.engine import SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from ..errors import UserError

logger = logging.getLogger(__name__)

DIVERGED_FIX = (
    "lower SOLVER.BASE_LR, enable SOLVER.CLIP_GRADIENTS (CLIP_TYPE full_model, CLIP_VALUE 0.01), "
    "or, with SOLVER.AMP on, use DTYPE bfloat16 or switch it off; the checkpoints written before "
    "are intact"
)


class TrainingDiverged(UserError):
    """The loss, the gradients or the weights became NaN or infinite at ``iteration``
    (0-based; the message counts from 1, like the training log)."""

    def __init__(self, iteration: int, what: str):
        self.iteration = iteration
        super().__init__(f"training diverged at iteration {iteration + 1}", what, DIVERGED_FIX)


def step_seed(seed: int, iteration: int, rank: int) -> int:
    return (seed * 999_983 + iteration * 104_729 + rank * 7_727 + 1) % (2**31 - 1)


def total_norm(tensors) -> float:
    """The 2-norm over ``tensors`` (inf/NaN when any element is)."""
    tensors = [t.detach() for t in tensors]
    if not tensors:
        return 0.0
    return float(torch.nn.utils.get_total_norm(tensors, 2.0))


def all_ranks_true(flag: bool) -> bool:
    """``flag`` and-ed over the processes (one tiny all-reduce under several processes)."""
    if comm.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _describe(loss_dict) -> str:
    bad = [f"{k} {v.item()}" for k, v in loss_dict.items() if not math.isfinite(v.item())]
    return ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")


class SegCLIPTrainLoop(SimpleTrainer):
    """``SimpleTrainer`` with gradient clipping, AMP on CPU or CUDA, per-step seeding and the
    divergence checks (module doc).

    Args:
        model, data_loader, optimizer: as for ``SimpleTrainer``.
        grad_clipper: called with the model's parameters after backward (or None); may return
            the total gradient norm before clipping.
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

        loss_dict, losses = self._forward(data)
        self.optimizer.zero_grad()
        if self.grad_scaler is not None:
            self.grad_scaler.scale(losses).backward()
            self.grad_scaler.unscale_(self.optimizer)
        else:
            losses.backward()
        norm = self.grad_clipper(self.model.parameters()) if self.grad_clipper else None
        if self.grad_scaler is None:  # with a scaler, inf gradients skip the step (normal)
            self._check_gradients(norm)

        self._write_metrics(loss_dict, data_time)
        self._step()
        self._check_weights()

    def _forward(self, data):
        """The loss terms and their (fp32) sum; a non-finite loss on any rank stops here."""
        try:
            with torch.autocast(
                self.device_type,
                dtype=self.amp_dtype or torch.float32,
                enabled=bool(self.amp_dtype),
            ):
                loss_dict = self.model(data)
        except FloatingPointError as e:  # the matcher's "matching cost is not finite"
            raise TrainingDiverged(self.iter, f"{e}") from e
        if isinstance(loss_dict, torch.Tensor):
            loss_dict = {"total_loss": loss_dict}
        losses = sum(v.float() for v in loss_dict.values())
        finite = bool(torch.isfinite(losses.detach()))
        if not all_ranks_true(finite):
            what = f"the loss is not finite ({_describe(loss_dict)})" if not finite else ""
            raise TrainingDiverged(self.iter, what or "the loss of another process is not finite")
        return loss_dict, losses

    def _check_gradients(self, norm) -> None:
        if norm is None:
            norm = total_norm(p.grad for p in self.model.parameters() if p.grad is not None)
        if not math.isfinite(float(norm)):
            raise TrainingDiverged(self.iter, f"the gradient norm is {float(norm)}")

    def _step(self) -> None:
        if self.grad_scaler is None:
            self.optimizer.step()
            return
        scale = self.grad_scaler.get_scale()
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        if self.grad_scaler.get_scale() < scale:  # inf/NaN gradients: the step was skipped
            self.skipped_steps += 1
        get_event_storage().put_scalar(
            "amp_skipped_steps", self.skipped_steps, smoothing_hint=False
        )

    def _check_weights(self) -> None:
        norm = total_norm(p for p in self.model.parameters() if p.requires_grad)
        if not math.isfinite(norm):
            raise TrainingDiverged(self.iter, "the weights are not finite after the optimizer step")

    def state_dict(self):
        ret = super().state_dict()
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
