"""Training hooks detectron2 0.5 does not have."""

from __future__ import annotations

import logging
import math
import operator
import os

from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

logger = logging.getLogger(__name__)


class BestCheckpointer(HookBase):
    """Save ``<file_prefix>.pth`` whenever evaluation improves ``metric`` (e.g. "sem_seg/mIoU").

    Must be registered after detectron2's ``EvalHook`` (it reads the metric that hook put into
    the event storage at this iteration). The "last_checkpoint" tag keeps pointing at the latest
    periodic checkpoint, so ``--resume`` does not go back to the best one. The best value is part
    of the trainer's state, so it survives resuming.
    """

    def __init__(
        self,
        eval_period: int,
        checkpointer,
        metric: str,
        mode: str = "max",
        file_prefix: str = "model_best",
    ):
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self._period = eval_period
        self._checkpointer = checkpointer
        self._metric = metric
        self._compare = operator.gt if mode == "max" else operator.lt
        self._file_prefix = file_prefix
        self.best_value: float | None = None
        self.best_iter: int | None = None
        self._warned = False

    def _save(self, value: float, iteration: int) -> None:
        ckpt = self._checkpointer
        previous = None
        if ckpt.has_checkpoint():
            previous = os.path.basename(ckpt.get_checkpoint_file())
        ckpt.save(self._file_prefix, iteration=iteration, best_metric=value)
        if comm.is_main_process():  # Checkpointer.save re-tagged "last_checkpoint": undo
            tag = os.path.join(ckpt.save_dir, "last_checkpoint")
            if previous:
                ckpt.tag_last_checkpoint(previous)
            elif PathManager.exists(tag):
                PathManager.rm(tag)

    def _check(self) -> None:
        latest = self.trainer.storage.latest()
        if self._metric not in latest:
            if not self._warned:
                logger.warning(
                    f"BestCheckpointer: metric '{self._metric}' was not produced by evaluation "
                    f"(available: {sorted(latest)[:20]}); model_best.pth is not written"
                )
                self._warned = True
            return
        value, metric_iter = latest[self._metric]
        value = float(value)
        if metric_iter != self.trainer.iter or not math.isfinite(value):
            return
        if self.best_value is None or self._compare(value, self.best_value):
            previous = self.best_value
            self.best_value, self.best_iter = value, metric_iter
            self._save(value, metric_iter)
            logger.info(
                f"New best {self._metric} = {value:.4f} at iteration {metric_iter} "
                f"(previous: {previous}); saved {self._file_prefix}.pth"
            )

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if (
            self._period > 0
            and next_iter % self._period == 0
            and next_iter != self.trainer.max_iter
        ):
            self._check()

    def after_train(self):
        if self.trainer.iter + 1 >= self.trainer.max_iter:
            self._check()

    def state_dict(self):
        if self.best_value is None:
            return {}
        return {"best_value": self.best_value, "best_iter": self.best_iter}

    def load_state_dict(self, state_dict):
        self.best_value = state_dict.get("best_value")
        self.best_iter = state_dict.get("best_iter")
