#!/usr/bin/env python
"""Score a folder of predicted class-id PNGs against a registered split's ground truth.

Each image ``<stem>.png`` of the split needs a prediction ``PRED_DIR/<stem>.png``: single-channel
uint8 train ids 0..K-1, the size of the image. The metrics come from the same code as training-time
evaluation (:class:`segclip_d2.data.evaluator.RemoteSensingSemSegEvaluator`), in percent.

    python tools/evaluate_predictions.py --dataset loveda_val --pred-dir preds/ \
        [--output metrics.json] [--plots-dir DIR]

Exit code 2 with a message naming the file when a prediction is missing, unreadable, of the
wrong size or holds values outside 0..K-1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
from PIL import Image

try:
    import segclip_d2  # noqa: F401  (registers the splits)
except ImportError:  # running from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import segclip_d2  # noqa: F401

from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from tqdm import tqdm  # noqa: E402

from segclip_d2.data.evaluator import (  # noqa: E402
    RemoteSensingSemSegEvaluator,
    metrics_json,
    segmentation_metrics,
)
from segclip_d2.data.mapper import read_class_png, read_label  # noqa: E402


class PredictionError(ValueError):
    """A missing or malformed prediction file."""


def read_prediction(path: Path, shape: tuple[int, int], num_classes: int) -> np.ndarray:
    if not path.is_file():
        raise PredictionError(f"{path}: prediction file is missing")
    pred = read_class_png(path, "prediction", PredictionError)
    if pred.shape != shape:
        raise PredictionError(
            f"{path}: prediction is {pred.shape[1]}x{pred.shape[0]} (WxH), the image is "
            f"{shape[1]}x{shape[0]}"
        )
    if pred.size and pred.max() >= num_classes:
        bad = np.unique(pred[pred >= num_classes]).tolist()
        raise PredictionError(f"{path}: values {bad[:10]} outside the classes 0..{num_classes - 1}")
    return pred


def evaluate(dataset: str, pred_dir: Path, plots_dir: Path | None = None) -> dict:
    """Metrics JSON (percent) of the predictions in ``pred_dir`` on split ``dataset``."""
    records = DatasetCatalog.get(dataset)
    meta = MetadataCatalog.get(dataset)
    if not meta.get("labelled", True) or any("sem_seg_file_name" not in r for r in records):
        raise PredictionError(f"split {dataset!r} has no ground truth to score against")
    evaluator = RemoteSensingSemSegEvaluator(
        dataset, distributed=False, output_dir=str(plots_dir) if plots_dir else None
    )
    k = evaluator.num_classes
    for rec in tqdm(records, desc=f"scoring {dataset}", unit="img"):
        with Image.open(rec["file_name"]) as im:
            w, h = im.size
        gt = read_label(rec["sem_seg_file_name"], rec["file_name"], (h, w), k)
        pred_path = pred_dir / (Path(rec["file_name"]).stem + ".png")
        evaluator.add(gt, read_prediction(pred_path, (h, w), k), str(pred_path))
    if plots_dir:
        evaluator.evaluate()  # also writes the table, JSON and confusion matrix to plots_dir
    res = segmentation_metrics(evaluator.confusion, evaluator.class_names)
    return metrics_json(
        res,
        evaluator.class_names,
        dataset=dataset,
        num_images=len(records),
        pred_dir=str(pred_dir),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="registered split, e.g. loveda_val")
    p.add_argument("--pred-dir", type=Path, required=True, help="folder of <stem>.png predictions")
    p.add_argument("--output", type=Path, default=None, help="write the metrics JSON here")
    p.add_argument(
        "--plots-dir", type=Path, default=None, help="also write the confusion matrix (npy/png)"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.dataset not in DatasetCatalog.list():
        print(f"error: unknown split {args.dataset!r}", file=sys.stderr)
        return 2
    if not args.pred_dir.is_dir():
        print(f"error: {args.pred_dir}: prediction folder not found", file=sys.stderr)
        return 2
    try:
        result = evaluate(args.dataset, args.pred_dir, args.plots_dir)
    except (PredictionError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.output.with_name(f".{args.output.name}.tmp")
        tmp.write_text(text + "\n")
        tmp.replace(args.output)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
