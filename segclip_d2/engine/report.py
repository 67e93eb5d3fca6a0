"""What a training run shows its user: the log line (ETA, it/s, losses), ``curves.png`` (loss
terms and validation mIoU over iterations) and the prediction panel (image | ground truth |
prediction, with a legend)."""

from __future__ import annotations

import datetime
import logging
import os
import statistics

import numpy as np
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.events import EventWriter, get_event_storage

from ..utils.atomic import atomic_output

logger = logging.getLogger("segclip_d2.train")

# Loss terms plotted and printed: the final prediction's and the guidance group's (the auxiliary
# per-layer terms ``loss_ce_0`` ... are in metrics.json and TensorBoard).
MAIN_LOSSES = (
    "total_loss",
    "loss_ce",
    "loss_mask",
    "loss_dice",
    "loss_gtg_ce",
    "loss_gtg_mask",
    "loss_gtg_dice",
)
MIOU_KEY = "sem_seg/mIoU"


def format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(round(seconds))))


class TrainingLogPrinter(EventWriter):
    """One line per period: ``iter 120/300  eta 0:02:41  1.12 it/s  lr 1e-03  total_loss ...``.

    Speed is the median of the last ``window`` iteration times (detectron2's IterationTimer), so
    a slow evaluation or checkpoint does not distort it.
    """

    def __init__(self, max_iter: int, window: int = 20):
        self.max_iter = max_iter
        self.window = window

    def write(self):
        storage = get_event_storage()
        # After a finished run the trainer's iteration is max_iter (detectron2): the last step
        # done is max_iter - 1.
        iteration = min(storage.iter, self.max_iter - 1)
        if iteration + 1 >= self.max_iter and "time" not in storage.histories():
            return
        parts = [f"iter {iteration + 1}/{self.max_iter}"]
        try:
            times = [v for v, _ in storage.history("time").values()[-self.window :]]
        except KeyError:
            times = []
        if times:
            sec = statistics.median(times)
            parts.append(f"eta {format_eta(max(0.0, sec * (self.max_iter - iteration - 1)))}")
            parts.append(f"{1.0 / sec:.2f} it/s" if sec > 0 else "- it/s")
        hist = storage.histories()
        if "lr" in hist:
            parts.append(f"lr {hist['lr'].latest():.2e}")
        for name in MAIN_LOSSES:
            if name in hist:
                parts.append(f"{name} {hist[name].median(self.window):.3f}")
        if "amp_skipped_steps" in hist:
            parts.append(f"skipped steps {int(hist['amp_skipped_steps'].latest())}")
        logger.info("  ".join(parts))


def plot_curves(storage, path: str) -> bool:
    """Write ``path`` (PNG): loss terms (left) and validation mIoU (right) over iterations.
    Returns False when matplotlib is missing (logged once by the caller)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    hist = storage.histories()
    fig, (ax_loss, ax_miou) = plt.subplots(1, 2, figsize=(11, 4))
    for name in MAIN_LOSSES:
        if name in hist:
            values = hist[name].values()
            ax_loss.plot([i for _, i in values], [v for v, _ in values], label=name, lw=1)
    ax_loss.set_xlabel("iteration")
    ax_loss.set_ylabel("loss (weighted)")
    ax_loss.set_yscale("log")
    ax_loss.legend(fontsize=7)
    ax_loss.set_title("training losses")
    if MIOU_KEY in hist:
        values = hist[MIOU_KEY].values()
        ax_miou.plot([i for _, i in values], [v for v, _ in values], "o-", color="C3")
    else:
        ax_miou.text(0.5, 0.5, "no evaluation yet", ha="center", va="center")
    ax_miou.set_xlabel("iteration")
    ax_miou.set_ylabel("mIoU (%)")
    ax_miou.set_title("validation mIoU")
    fig.tight_layout()
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=90, format="png")
    finally:
        plt.close(fig)
    return True


class CurvesWriter(HookBase):
    """Rewrite ``OUTPUT_DIR/curves.png`` after every evaluation and at the end of training.
    Register after detectron2's EvalHook (main process only)."""

    def __init__(self, output_dir: str, eval_period: int):
        self.path = os.path.join(output_dir, "curves.png")
        self.eval_period = eval_period
        self._warned = False

    def _write(self):
        if not plot_curves(self.trainer.storage, self.path) and not self._warned:
            logger.warning("matplotlib is not installed: curves.png is not written")
            self._warned = True

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if self.eval_period > 0 and next_iter % self.eval_period == 0:
            self._write()

    def after_train(self):
        if comm.is_main_process():
            self._write()


def _legend(names, colors, width: int) -> np.ndarray:
    """Rows of colour swatches and class names, ``width`` pixels wide (RGB uint8)."""
    import cv2

    cell_w, cell_h = 170, 26
    per_row = max(1, width // cell_w)
    rows = (len(names) + per_row - 1) // per_row
    out = np.full((rows * cell_h + 8, width, 3), 255, np.uint8)
    for k, (name, color) in enumerate(zip(names, colors)):
        x, y = (k % per_row) * cell_w + 6, (k // per_row) * cell_h + 6
        cv2.rectangle(out, (x, y), (x + 18, y + 18), tuple(int(c) for c in color), -1)
        cv2.rectangle(out, (x, y), (x + 18, y + 18), (0, 0, 0), 1)
        cv2.putText(out, name, (x + 24, y + 15), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
    return out


def compose_panel(image, ground_truth, prediction, facts) -> np.ndarray:
    """image | ground truth | prediction side by side, titled, with the class legend below.

    Args:
        image: (H, W, 3) uint8 RGB.
        ground_truth: (H, W) train ids (255 = ignore, drawn black) or None (unlabelled).
        prediction: (H, W) train ids.
        facts: the dataset's :class:`~segclip_d2.data.dataset_facts.DatasetFacts`.

    Returns:
        (H', 3W + 2 gaps, 3) uint8 RGB.
    """
    import cv2

    h, w = prediction.shape
    if ground_truth is None:
        gt = np.full((h, w, 3), 200, np.uint8)
        cv2.putText(gt, "no labels", (10, h // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 0, 0), 2)
    else:
        gt = facts.colorize(ground_truth)
    tiles = [np.ascontiguousarray(image[:h, :w]), gt, facts.colorize(prediction)]
    titles = ["image", "ground truth", "prediction"]
    gap = np.full((h + 28, 6, 3), 255, np.uint8)
    columns = []
    for k, (tile, title) in enumerate(zip(tiles, titles)):
        head = np.full((28, w, 3), 255, np.uint8)
        cv2.putText(head, title, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1)
        columns.append(np.concatenate([head, tile], 0))
        if k < 2:
            columns.append(gap)
    top = np.concatenate(columns, 1)
    return np.concatenate([top, _legend(facts.classes, facts.colors, top.shape[1])], 0)
