"""The training run's checkpointer: the model-card checkpointer of
:mod:`segclip_d2.checkpoint.checkpointer` (atomic saves), which also refuses to write weights
that are not finite, and turns a full disk into one line naming the file and the free space.
Loading ``MODEL.WEIGHTS`` for a model of other bands than RGB widens the weights' RGB input
convolution to those bands (:mod:`segclip_d2.checkpoint.widen`): an ImageNet ``.pkl`` backbone
or an RGB SegCLIP checkpoint then starts the N-band model instead of leaving its stem random.

Either way nothing is replaced: ``atomic_output`` leaves the previous file and
``last_checkpoint`` as they were.
"""

from __future__ import annotations

import errno
import os
import shutil

import torch

from ..checkpoint.checkpointer import ModelCardCheckpointer
from ..checkpoint.widen import widen_checkpoint_inputs
from ..errors import UserError

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# What torch.save raises when a write of its zip writer fails (a full disk among others).
_TORCH_WRITE_ERRORS = ("PytorchStreamWriter", "inline_container", "file write failed")


def non_finite_entries(state_dict: dict) -> list[str]:
    """Names of the floating-point tensors of ``state_dict`` holding NaN or inf."""
    return [
        k
        for k, v in state_dict.items()
        if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]


def _free_mb(folder: str) -> float | None:
    try:
        return shutil.disk_usage(folder).free / 2**20
    except OSError:
        return None


def _state_mb(state_dict: dict) -> float:
    return sum(v.numel() * v.element_size() for v in state_dict.values() if torch.is_tensor(v)) / (
        2**20
    )


class TrainingCheckpointer(ModelCardCheckpointer):
    """``save`` refuses non-finite weights and reports a failed write as a user error; loading
    widens RGB input convolutions to the model's bands."""

    def _load_model(self, checkpoint):
        model = getattr(self.model, "module", self.model)  # DDP
        weights = checkpoint.get("model")
        if isinstance(weights, dict):
            widen_checkpoint_inputs(
                weights, model.state_dict(), getattr(model, "input_bands", None), "MODEL.WEIGHTS"
            )
        return super()._load_model(checkpoint)

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        bad = non_finite_entries(self.model.state_dict())
        if bad:
            raise UserError(
                os.path.join(self.save_dir, f"{name}.pth"),
                f"not written: {len(bad)} weights are NaN or infinite (e.g. {bad[0]})",
                "the training diverged: lower SOLVER.BASE_LR or enable SOLVER.CLIP_GRADIENTS; "
                "the checkpoints written before are intact",
            )
        try:
            super().save(name, **kwargs)
        except (OSError, RuntimeError) as e:
            self._raise_write_error(name, e)

    def _raise_write_error(self, name: str, e: Exception) -> None:
        """A user error for a failed write (disk full, quota, read-only); others re-raised."""
        path = os.path.join(self.save_dir, f"{name}.pth")
        if isinstance(e, RuntimeError) and not any(t in str(e) for t in _TORCH_WRITE_ERRORS):
            raise e
        free = _free_mb(self.save_dir)
        needed = 2.5 * _state_mb(self.model.state_dict())  # model + AdamW moments
        full = getattr(e, "errno", None) in DISK_FULL_ERRNOS or (free is not None and free < needed)
        space = f" ({free:.0f} MB free, about {needed:.0f} MB needed)" if free is not None else ""
        what = "no space left on device" if full else " ".join(str(e).split())[:200]
        raise UserError(
            path,
            f"could not be written: {what}{space}",
            "free disk space (or pick an OUTPUT_DIR on another disk) and continue with --resume; "
            "the checkpoints written before are intact",
        ) from e
