"""Remote-sensing semantic segmentation evaluation.

:class:`RemoteSensingSemSegEvaluator` accumulates a K x K confusion matrix (rows = ground truth,
columns = prediction; ground-truth pixels equal to the ignore value are skipped) and reports, in
percent, under the key ``"sem_seg"``:

* ``mIoU`` and ``IoU-<class>``: TP / (TP + FP + FN);
* ``mF1`` and ``F1-<class>``: 2 TP / (2 TP + FP + FN);
* ``mAcc`` and ``Acc-<class>``: TP / (TP + FN) (per-class recall);
* ``OA``: overall pixel accuracy, sum(TP) / valid pixels;
* ``fwIoU``: IoU weighted by each class's ground-truth pixel frequency.

A prediction of ``NO_PREDICTION`` (255, the demo's value for pixels it could not predict, e.g.
the input's no-data) counts as wrong wherever the ground truth is valid: a false negative of the
true class that no class gains as a false positive. Their number is reported
(``no_prediction_pixels``).

A class absent from both the ground truth and the predictions has no IoU/F1 (NaN); it is left
out of the means (``nanmean``), so a class that never occurs neither helps nor hurts. A class
absent from the ground truth but predicted gets IoU = F1 = 0. ``Acc-<class>`` is NaN whenever the
class is absent from the ground truth.

With several processes, each one's confusion matrix is gathered and summed on the main process,
which computes the metrics, logs a per-class table and writes ``sem_seg_metrics.json``,
``confusion_matrix.npy`` and ``confusion_matrix.png`` to ``output_dir``.

:func:`build_evaluator` picks the evaluator of a split from its metadata: metrics
(``evaluator_type``) or, with ``TEST.FORMAT_ONLY``, the split's submission writer
(``formatter``, see :mod:`segclip_d2.data.formatters`).
"""

from __future__ import annotations

import json
import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from PIL import Image
from tabulate import tabulate

from ..utils.atomic import atomic_output
from .dataset_facts import IGNORE_LABEL

logger = logging.getLogger(__name__)

# A predicted value meaning "no prediction here" (demo/demo.py's no-data value).
NO_PREDICTION = 255


# --------------------------------------------------------------------------- metrics
def confusion_matrix(
    gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore_label: int = IGNORE_LABEL
) -> np.ndarray:
    """``(K, K)`` int64 confusion matrix of one image, rows = ground truth, cols = prediction.

    ``gt`` and ``pred`` are integer arrays of the same shape; ``gt == ignore_label`` is skipped.
    """
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
    gt = gt.astype(np.int64).ravel()
    pred = pred.astype(np.int64).ravel()
    valid = gt != ignore_label
    gt, pred = gt[valid], pred[valid]
    if gt.size and (gt.min() < 0 or gt.max() >= num_classes):
        raise ValueError(f"ground-truth values outside 0..{num_classes - 1} and {ignore_label}")
    if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"predicted values outside 0..{num_classes - 1}")
    return np.bincount(gt * num_classes + pred, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


def missed_pixels(
    gt: np.ndarray,
    pred: np.ndarray,
    num_classes: int,
    ignore_label: int = IGNORE_LABEL,
    no_prediction: int = NO_PREDICTION,
) -> np.ndarray:
    """``(K,)`` int64: per ground-truth class, the valid pixels predicted as ``no_prediction``."""
    gt = gt.astype(np.int64).ravel()
    miss = (pred.ravel() == no_prediction) & (gt != ignore_label)
    return np.bincount(gt[miss], minlength=num_classes)[:num_classes]


def segmentation_metrics(
    conf: np.ndarray, class_names: Sequence[str], missed: np.ndarray | None = None
) -> OrderedDict:
    """Metrics (percent) from a ``(K, K)`` confusion matrix; see the module docstring.
    ``missed`` (K,): valid pixels of each class left without a prediction (false negatives).

    Returns an ordered dict with ``mIoU, mF1, OA, fwIoU, mAcc`` then ``IoU-<c>``, ``F1-<c>``,
    ``Acc-<c>`` for every class; undefined per-class values are NaN.
    """
    conf = conf.astype(np.float64)
    k = conf.shape[0]
    if conf.shape != (k, k) or len(class_names) != k:
        raise ValueError(f"confusion matrix {conf.shape} does not match {len(class_names)} classes")
    missed = np.zeros(k) if missed is None else np.asarray(missed, dtype=np.float64)
    tp = np.diag(conf)
    gt_count = conf.sum(axis=1) + missed  # TP + FN
    pred_count = conf.sum(axis=0)  # TP + FP
    total = conf.sum() + missed.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        union = gt_count + pred_count - tp
        iou = np.where(union > 0, tp / union, np.nan)
        f1 = np.where(gt_count + pred_count > 0, 2 * tp / (gt_count + pred_count), np.nan)
        acc = np.where(gt_count > 0, tp / gt_count, np.nan)
    freq = gt_count / total if total > 0 else np.zeros(k)
    present = gt_count > 0

    def nanmean(x):
        return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")

    res = OrderedDict()
    res["mIoU"] = 100 * nanmean(iou)
    res["mF1"] = 100 * nanmean(f1)
    res["OA"] = 100 * float(tp.sum() / total) if total > 0 else float("nan")
    res["fwIoU"] = 100 * float(np.sum(freq[present] * iou[present])) if total > 0 else float("nan")
    res["mAcc"] = 100 * nanmean(acc)
    res["no_prediction_pixels"] = int(missed.sum())
    for name, v in zip(class_names, iou):
        res[f"IoU-{name}"] = 100 * float(v)
    for name, v in zip(class_names, f1):
        res[f"F1-{name}"] = 100 * float(v)
    for name, v in zip(class_names, acc):
        res[f"Acc-{name}"] = 100 * float(v)
    return res


def metrics_json(res: dict, class_names: Sequence[str], **extra) -> dict:
    """JSON-friendly form: summary numbers plus ``IoU``/``F1``/``Acc`` mappings by class name
    (NaN -> null)."""

    def clean(v):
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(v, 4)

    out = {key: clean(res[key]) for key in ("mIoU", "mF1", "OA", "fwIoU", "mAcc")}
    for metric in ("IoU", "F1", "Acc"):
        out[metric] = {c: clean(res[f"{metric}-{c}"]) for c in class_names}
    out["no_prediction_pixels"] = int(res.get("no_prediction_pixels", 0))
    out["unit"] = "percent"
    out.update(extra)
    return out


def _atomic_save(path: Path, writer) -> None:
    with atomic_output(path) as tmp:
        writer(tmp)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a path
        np.save(f, array)


def plot_confusion_matrix(conf: np.ndarray, class_names: Sequence[str], path: Path) -> None:
    """Row-normalised confusion matrix as a PNG (matplotlib Agg), class names on both axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(class_names)
    rows = conf.sum(axis=1, keepdims=True)
    norm = np.divide(conf, rows, out=np.zeros(conf.shape, dtype=np.float64), where=rows > 0)
    size = max(5.0, 0.5 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(k), labels=list(class_names), rotation=60, ha="right")
    ax.set_yticks(range(k), labels=list(class_names))
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title("confusion matrix (rows normalised)")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if norm[i, j] >= 0.005:
                    color = "white" if norm[i, j] > 0.5 else "black"
                    ax.text(
                        j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7, color=color
                    )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    _atomic_save(path, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)


# --------------------------------------------------------------------------- evaluators
def _read_gt(path: str) -> np.ndarray:
    with Image.open(path) as im:
        if im.mode not in ("L", "P"):
            raise ValueError(
                f"{path}: ground truth must be single-channel train ids, got {im.mode}"
            )
        return np.array(im, dtype=np.uint8)


class RemoteSensingSemSegEvaluator(DatasetEvaluator):
    """mIoU / mF1 / OA / fwIoU / mAcc and per-class scores of a semantic segmentation split."""

    def __init__(
        self,
        dataset_name: str,
        distributed: bool = True,
        output_dir: str | None = None,
        *,
        num_classes: int | None = None,
        ignore_label: int | None = None,
    ):
        meta = MetadataCatalog.get(dataset_name)
        self.dataset_name = dataset_name
        self.class_names = list(meta.stuff_classes)
        self.num_classes = num_classes or len(self.class_names)
        if self.num_classes != len(self.class_names):
            raise ValueError(f"{dataset_name}: {len(self.class_names)} classes, not {num_classes}")
        self.ignore_label = (
            meta.get("ignore_label", IGNORE_LABEL) if ignore_label is None else (ignore_label)
        )
        self.distributed = distributed
        self.output_dir = output_dir
        self.reset()

    def reset(self):
        self._conf = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self._missed = np.zeros(self.num_classes, dtype=np.int64)
        self._num_images = 0

    @property
    def confusion(self) -> np.ndarray:
        """This process's ``(K, K)`` confusion matrix so far (rows = ground truth)."""
        return self._conf

    @property
    def missed(self) -> np.ndarray:
        """This process's ``(K,)`` count of valid pixels predicted as ``NO_PREDICTION``."""
        return self._missed

    def add(self, gt: np.ndarray, pred: np.ndarray, source: str = "<prediction>") -> None:
        """Accumulate one image: ``gt`` (H, W) train ids (ignore allowed), ``pred`` (H, W) ids,
        ``NO_PREDICTION`` allowed (counted wrong where ``gt`` is valid)."""
        if gt.shape != pred.shape:
            raise ValueError(
                f"{source}: prediction is {pred.shape[1]}x{pred.shape[0]} (WxH) but the ground "
                f"truth is {gt.shape[1]}x{gt.shape[0]}"
            )
        try:
            none = pred == NO_PREDICTION
            if none.any():
                self._missed += missed_pixels(gt, pred, self.num_classes, self.ignore_label)
                gt = np.where(none, self.ignore_label, gt)
                pred = np.where(none, 0, pred)
            self._conf += confusion_matrix(gt, pred, self.num_classes, self.ignore_label)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from e
        self._num_images += 1

    def process(self, inputs, outputs):
        """``inputs``: mapper dicts with ``sem_seg`` (H, W) or ``sem_seg_file_name``;
        ``outputs``: ``[{"sem_seg": (K, H, W) scores}]`` at the original image size."""
        for inp, out in zip(inputs, outputs):
            scores = out["sem_seg"]  # (K, H, W)
            if scores.dim() != 3 or scores.shape[0] != self.num_classes:
                raise ValueError(
                    f"{inp.get('file_name')}: expected sem_seg scores of shape "
                    f"({self.num_classes}, H, W), got {tuple(scores.shape)}"
                )
            pred = scores.argmax(dim=0).to("cpu", torch.int64).numpy()  # (H, W)
            if "sem_seg" in inp:
                gt = inp["sem_seg"]
                gt = gt.cpu().numpy() if isinstance(gt, torch.Tensor) else np.asarray(gt)
                source = inp.get("file_name", "<input>")
            elif "sem_seg_file_name" in inp:
                source = inp["sem_seg_file_name"]
                gt = _read_gt(source)
            else:
                raise ValueError(
                    f"{inp.get('file_name')}: no ground truth ('sem_seg' or 'sem_seg_file_name'); "
                    f"split {self.dataset_name} may be unlabelled - use TEST.FORMAT_ONLY"
                )
            self.add(gt, pred, source)

    def evaluate(self):
        conf, missed, num_images = self._conf, self._missed, self._num_images
        if self.distributed:
            comm.synchronize()
            gathered = comm.all_gather((self._conf, self._missed, self._num_images))
            if not comm.is_main_process():
                return None
            conf = np.sum([c for c, _, _ in gathered], axis=0)
            missed = np.sum([m for _, m, _ in gathered], axis=0)
            num_images = sum(n for _, _, n in gathered)
        if num_images == 0:
            logger.warning(f"[{self.dataset_name}] evaluator received no images")
            return None
        res = segmentation_metrics(conf, self.class_names, missed)
        self._log_table(res, conf)
        if self.output_dir:
            out = Path(self.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            data = metrics_json(
                res, self.class_names, dataset=self.dataset_name, num_images=num_images
            )
            _atomic_save(
                out / "sem_seg_metrics.json",
                lambda p: p.write_text(json.dumps(data, indent=2) + "\n"),
            )
            _atomic_save(out / "confusion_matrix.npy", lambda p: _save_npy(p, conf))
            plot_confusion_matrix(conf, self.class_names, out / "confusion_matrix.png")
        return OrderedDict({"sem_seg": res})

    def _log_table(self, res: dict, conf: np.ndarray) -> None:
        gt = conf.sum(axis=1)
        total = max(int(gt.sum()), 1)
        rows = [
            [
                c,
                f"{res[f'IoU-{c}']:.2f}",
                f"{res[f'F1-{c}']:.2f}",
                f"{res[f'Acc-{c}']:.2f}",
                f"{100.0 * gt[i] / total:.2f}",
            ]
            for i, c in enumerate(self.class_names)
        ]
        table = tabulate(rows, headers=["class", "IoU", "F1", "Acc", "GT px %"], tablefmt="github")
        summary = ", ".join(f"{k} {res[k]:.2f}" for k in ("mIoU", "mF1", "OA", "fwIoU", "mAcc"))
        if res.get("no_prediction_pixels"):
            summary += (
                f"; {res['no_prediction_pixels']} labelled pixels had no prediction "
                f"({NO_PREDICTION}), counted wrong"
            )
        logger.info(f"[{self.dataset_name}] per-class results (%):\n{table}\n{summary}")


class SemSegFormatOnlyEvaluator(DatasetEvaluator):
    """Writes predictions in a benchmark's submission format (no metrics), via a formatter."""

    def __init__(self, dataset_name: str, output_dir: str, formatter_name: str):
        from .formatters import build_formatter

        if not output_dir:
            raise ValueError("format-only evaluation needs an output_dir")
        self.dataset_name = dataset_name
        self.formatter = build_formatter(formatter_name, dataset_name, output_dir)
        self.reset()

    def reset(self):
        self._count = 0

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            pred = out["sem_seg"].argmax(dim=0).to("cpu", torch.uint8).numpy()  # (H, W)
            self.formatter.write(inp, pred)
            self._count += 1

    def evaluate(self):
        comm.synchronize()
        total = sum(comm.all_gather(self._count))
        if not comm.is_main_process():
            return None
        paths = self.formatter.finalize()
        logger.info(
            f"[{self.dataset_name}] wrote {total} predictions in submission format: "
            + ", ".join(str(p) for p in paths)
        )
        return {}


# evaluator_type (dataset metadata) -> metrics evaluator class
EVALUATORS = {"sem_seg": RemoteSensingSemSegEvaluator}


def build_evaluator(cfg, dataset_name: str, output_dir: str | None = None) -> DatasetEvaluator:
    """The evaluator of a split, chosen from its metadata.

    ``TEST.FORMAT_ONLY``: the split's submission writer (metadata ``formatter``); otherwise the
    metrics evaluator of its ``evaluator_type`` (needs a labelled split).
    """
    meta = MetadataCatalog.get(dataset_name)
    if cfg.TEST.FORMAT_ONLY:
        name = meta.get("formatter", None)
        if name is None:
            raise ValueError(
                f"TEST.FORMAT_ONLY is set but split {dataset_name!r} has no submission formatter"
            )
        return SemSegFormatOnlyEvaluator(dataset_name, output_dir, name)
    if not meta.get("labelled", True):
        raise ValueError(
            f"split {dataset_name!r} has no labels, so metrics cannot be computed; set "
            "TEST.FORMAT_ONLY True to write a benchmark submission instead"
        )
    kind = meta.get("evaluator_type", "sem_seg")
    if kind not in EVALUATORS:
        raise ValueError(f"split {dataset_name!r}: no evaluator for evaluator_type {kind!r}")
    return EVALUATORS[kind](dataset_name, distributed=True, output_dir=output_dir)
