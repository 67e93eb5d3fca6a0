#!/usr/bin/env python
"""Score a folder of predicted class-id PNGs against a registered split's ground truth.

Each image ``<stem>.png`` of the split needs a prediction ``PRED_DIR/<stem>.png`` (or
``<stem>_pred.png``, as demo/demo.py writes it): single-channel uint8 train ids 0..K-1, the size of
the image; 255 means "no prediction" (the demo's no-data value) and counts as wrong wherever the
label is valid (the number of such pixels is reported). The metrics come from the same code as
training-time evaluation (:class:`segclip_d2.data.evaluator.RemoteSensingSemSegEvaluator`), in
percent.

    python tools/evaluate_predictions.py --dataset loveda_val --pred-dir preds/ \
        [--output metrics.json] [--plots-dir DIR]

Errors follow :mod:`segclip_d2.errors` (one line, exit code 2) and name the file: a prediction
missing, unreadable, of the wrong size or with values outside 0..K-1 and 255; an unknown split
(registered ones listed, closest first). Files in ``--pred-dir`` that belong to no image of the
split are listed in one warning.
"""

from __future__ import annotations

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
    NO_PREDICTION,
    RemoteSensingSemSegEvaluator,
    metrics_json,
    segmentation_metrics,
)
from segclip_d2.data.mapper import read_class_png, read_label  # noqa: E402
from segclip_d2.errors import (  # noqa: E402
    ArgumentParser,
    UserError,
    check_dataset_present,
    check_datasets,
    check_writable_dir,
    run_main,
)
from segclip_d2.utils.atomic import atomic_output  # noqa: E402

logger = logging.getLogger("segclip_d2.evaluate_predictions")

# Names demo/demo.py writes next to a prediction; not "unknown" files in --pred-dir.
DEMO_COMPANIONS = ("_color.png", "_overlay.png", "_pred.tif")


class PredictionError(UserError, ValueError):
    """A missing or malformed prediction file."""

    def __init__(self, message: str, fix: str | None = None):
        where, _, what = message.partition(": ")
        super().__init__(where, what or message, fix)


def prediction_path(pred_dir: Path, stem: str) -> Path:
    """``<stem>.png``, else the demo's ``<stem>_pred.png``; the first when neither exists."""
    plain = pred_dir / f"{stem}.png"
    demo = pred_dir / f"{stem}_pred.png"
    return demo if not plain.is_file() and demo.is_file() else plain


def unknown_files(pred_dir: Path, stems: set[str]) -> list[str]:
    """Files of ``pred_dir`` that are no prediction (or demo companion) of an image stem."""
    known = set()
    for stem in stems:
        known |= {f"{stem}.png", f"{stem}_pred.png"} | {stem + c for c in DEMO_COMPANIONS}
    known.add("legend.png")
    return sorted(
        p.name
        for p in pred_dir.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name not in known
    )


def read_prediction(path: Path, shape: tuple[int, int], num_classes: int) -> np.ndarray:
    if not path.is_file():
        raise PredictionError(
            f"{path}: prediction file is missing", "predict every image of the split"
        )
    pred = read_class_png(path, "prediction", PredictionError)
    if pred.shape != shape:
        raise PredictionError(
            f"{path}: prediction is {pred.shape[1]}x{pred.shape[0]} (WxH), the image is "
            f"{shape[1]}x{shape[0]}"
        )
    bad_values = (pred >= num_classes) & (pred != NO_PREDICTION)
    if bad_values.any():
        bad = np.unique(pred[bad_values]).tolist()
        raise PredictionError(
            f"{path}: values {bad[:10]} outside the classes 0..{num_classes - 1} "
            f"(and {NO_PREDICTION} = no prediction)"
        )
    return pred


def evaluate(dataset: str, pred_dir: Path, plots_dir: Path | None = None) -> dict:
    """Metrics JSON (percent) of the predictions in ``pred_dir`` on split ``dataset``."""
    records = DatasetCatalog.get(dataset)
    meta = MetadataCatalog.get(dataset)
    if not meta.get("labelled", True) or any("sem_seg_file_name" not in r for r in records):
        raise UserError("--dataset", f"split {dataset!r} has no ground truth to score against")
    extra = unknown_files(pred_dir, {Path(r["file_name"]).stem for r in records})
    if extra:
        logger.warning(
            "%s: %d file(s) belong to no image of %s and are not scored: %s",
            pred_dir,
            len(extra),
            dataset,
            ", ".join(extra[:10]) + (", ..." if len(extra) > 10 else ""),
        )
    evaluator = RemoteSensingSemSegEvaluator(
        dataset, distributed=False, output_dir=str(plots_dir) if plots_dir else None
    )
    k = evaluator.num_classes
    for rec in tqdm(records, desc=f"scoring {dataset}", unit="img"):
        with Image.open(rec["file_name"]) as im:
            w, h = im.size
        gt = read_label(rec["sem_seg_file_name"], rec["file_name"], (h, w), k)
        pred_path = prediction_path(pred_dir, Path(rec["file_name"]).stem)
        evaluator.add(gt, read_prediction(pred_path, (h, w), k), str(pred_path))
    if plots_dir:
        evaluator.evaluate()  # also writes the table, JSON and confusion matrix to plots_dir
    res = segmentation_metrics(evaluator.confusion, evaluator.class_names, evaluator.missed)
    if res["no_prediction_pixels"]:
        logger.warning(
            "%d labelled pixels have no prediction (%d) and count as wrong",
            res["no_prediction_pixels"],
            NO_PREDICTION,
        )
    return metrics_json(
        res,
        evaluator.class_names,
        dataset=dataset,
        num_images=len(records),
        pred_dir=str(pred_dir),
    )


def _main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="registered split, e.g. loveda_val")
    p.add_argument("--pred-dir", type=Path, required=True, help="folder of <stem>.png predictions")
    p.add_argument("--output", type=Path, default=None, help="write the metrics JSON here")
    p.add_argument(
        "--plots-dir", type=Path, default=None, help="also write the confusion matrix (npy/png)"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    check_datasets([args.dataset], "--dataset")
    if not args.pred_dir.is_dir():
        raise UserError(f"--pred-dir {args.pred_dir}", "prediction folder not found", None)
    for what, path in (("--output", args.output), ("--plots-dir", args.plots_dir)):
        if path is not None:
            check_writable_dir(path.parent if what == "--output" else path, what)
    if args.output is not None and args.output.is_dir():
        raise UserError(f"--output {args.output}", "is a folder", "name the JSON file to write")
    check_dataset_present(args.dataset, "--dataset")
    try:
        result = evaluate(args.dataset, args.pred_dir, args.plots_dir)
    except UserError:
        raise
    except (FileNotFoundError, ValueError) as e:  # ground truth problems name their file
        raise PredictionError(" ".join(str(e).split())) from e
    text = json.dumps(result, indent=2)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(args.output) as tmp:
            tmp.write_text(text + "\n")
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The tool under the error contract: 0, or 2 with one line on stderr."""
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
