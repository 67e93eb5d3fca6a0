#!/usr/bin/env python
"""Export a trained SegCLIP checkpoint to ONNX (onnxruntime, the Deepness QGIS plugin), then
verify the file against PyTorch.

    python tools/export_onnx.py --config-file configs/loveda/segclip_R50.yaml \\
        --weights output/loveda_R50/model_best.pth --tile-size 512 --output model.onnx \\
        [--opset 17] [--classes "road,water,forest"] [--verify-image tile.png] [--no-verify]

The file takes ``(B, 3, S, S)`` float32 normalised tiles (B dynamic, S = --tile-size) and gives
``(B, K, S, S)`` class probabilities summing to 1 (see :mod:`segclip_d2.deploy.export`), with the
Deepness metadata and the checkpoint's model card in ``metadata_props``.

Verification (on by default): one tile (``--verify-image``, else the first image of the config's
test dataset when it is on disk, else a synthetic aerial tile), centre-cropped or padded to S,
goes through onnxruntime (CPU) and through the PyTorch model in fp32 (its usual fast path). The
tool prints max |difference| of the probabilities and the fraction of pixels with the same top-1
class, and fails (exit 1, the file removed) when that fraction is below ``--min-agreement``
(default 99.9 %). Bad arguments or files: one ``error:`` line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segclip_d2.errors import UserError, run_main  # noqa: E402

logger = logging.getLogger("segclip_d2.export_onnx")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE", help="config of the model")
    p.add_argument("--weights", required=True, metavar="CKPT", help="trained checkpoint (.pth)")
    p.add_argument("--tile-size", type=int, default=512, help="static input size S (512)")
    p.add_argument("--output", required=True, metavar="FILE", help="ONNX file to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (17; GridSample needs 16)")
    p.add_argument(
        "--classes", default="", help="comma-separated vocabulary (needs the text class head)"
    )
    p.add_argument("--verify-image", default="", help="tile used by the round-trip check")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime round trip")
    p.add_argument(
        "--min-agreement", type=float, default=99.9, help="top-1 agreement needed, %% (99.9)"
    )
    p.add_argument("--allow-text-mismatch", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--debug", action="store_true", help="tracebacks for errors")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config KEY VALUE pairs")
    return p


def build(args):
    """(cfg, model with the checkpoint and its card loaded, card)."""
    from segclip_d2.checkpoint.card import build_model_card
    from segclip_d2.checkpoint.pretrained import PretrainedWeightsError
    from segclip_d2.predict.load import build_predictor

    opts = list(args.opts)
    if args.allow_text_mismatch:
        opts += ["MODEL.SEGCLIP.TEXT.ALLOW_MISMATCH", "True"]
    # the one loader: safe config and checkpoint reading, exact fit, finite weights
    loaded = build_predictor(
        args.config_file, args.weights, opts=opts, precision="fp32", optimize=False
    )
    cfg, model, card = loaded.cfg, loaded.model, loaded.card or None
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    try:
        if classes:
            model.set_vocabulary(classes)
        if card is None:
            logger.warning(
                "%s has no model card (older checkpoint): building one now", args.weights
            )
            card = build_model_card(cfg, model)
    except PretrainedWeightsError as e:
        raise UserError("MODEL.SEGCLIP.TEXT.PRETRAINED", str(e)) from e
    except ValueError as e:
        raise UserError("--classes", str(e)) from e
    if classes:
        from segclip_d2.data.visualize import vocabulary_colors

        card = dict(card)
        card["exported_vocabulary"] = {
            "class_names": classes,
            "colors": [
                list(c)
                for c in vocabulary_colors(classes, card["class_names"], card.get("colors") or [])
            ],
            "prompts": model.text_encoder.prompts(classes),
        }
        card["class_names"], card["colors"] = classes, card["exported_vocabulary"]["colors"]
        card["prompts"] = card["exported_vocabulary"]["prompts"]
        card["text_embeddings"] = model.text_embeddings().tolist()
    return cfg, model, card


def verification_tile(cfg, path: str, size: int):
    """(H=W=size, 3) uint8 RGB tile and a description of where it came from."""
    import cv2
    import numpy as np

    source = path
    if path:
        bgr = cv2.imread(path, cv2.IMREAD_COLOR)
        if bgr is None:
            raise UserError(path, "cannot be read as an image", "pass a PNG/JPEG/TIFF tile")
        rgb = bgr[:, :, ::-1]
    else:
        rgb = None
        try:
            from detectron2.data import DatasetCatalog

            records = DatasetCatalog.get(cfg.DATASETS.TEST[0]) if len(cfg.DATASETS.TEST) else []
            if records and os.path.isfile(records[0]["file_name"]):
                source = records[0]["file_name"]
                rgb = cv2.imread(source, cv2.IMREAD_COLOR)[:, :, ::-1]
        except (KeyError, OSError, ValueError, TypeError):
            rgb = None
        if rgb is None:
            from segclip_d2.data.synthetic import generate_tile

            rgb, _ = generate_tile(0, size=max(size, 64), nodata_prob=0.0)
            source = "synthetic aerial tile (seed 0)"
    h, w = rgb.shape[:2]
    y0, x0 = max(0, (h - size) // 2), max(0, (w - size) // 2)
    crop = rgb[y0 : y0 + size, x0 : x0 + size]
    tile = np.empty((size, size, 3), np.uint8)
    tile[:] = np.asarray(cfg.MODEL.PIXEL_MEAN, np.float32).round().astype(np.uint8)
    tile[: crop.shape[0], : crop.shape[1]] = crop
    return np.ascontiguousarray(tile), source


def round_trip(model, onnx_path: str, tile) -> dict:
    """onnxruntime vs PyTorch fp32 on one (S, S, 3) RGB tile."""
    import numpy as np
    import torch

    from segclip_d2.deploy.export import pytorch_probabilities
    from segclip_d2.deploy.onnx_predictor import OnnxSegmenter

    seg = OnnxSegmenter(onnx_path)
    t0 = time.perf_counter()
    ort_probs = seg.predict_batch(tile[None])[0]  # (K, S, S)
    t_ort = time.perf_counter() - t0
    image = torch.from_numpy(tile).permute(2, 0, 1)[None].float()
    t0 = time.perf_counter()
    ref = pytorch_probabilities(model, image)[0].numpy()
    t_pt = time.perf_counter() - t0
    top2 = np.sort(ref, axis=0)[-2:]  # how decided the reference is (a trivial map agrees)
    return {
        "classes_predicted": int(np.unique(ref.argmax(0)).size),
        "close_calls": float((top2[1] - top2[0] < 0.01).mean()),
        "max_abs_diff": float(np.abs(ort_probs - ref).max()),
        "top1_agreement": float((ort_probs.argmax(0) == ref.argmax(0)).mean()),
        "prob_sum_range": [float(ort_probs.sum(0).min()), float(ort_probs.sum(0).max())],
        "onnxruntime_s": t_ort,
        "pytorch_s": t_pt,
    }


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("segclip_d2").setLevel(logging.INFO)
    if args.tile_size <= 0:
        raise UserError("--tile-size", f"must be positive, got {args.tile_size}")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise UserError(args.output, f"folder {out_dir} does not exist")
    cfg, model, card = build(args)

    from segclip_d2.deploy.export import export_onnx

    tmp = args.output + ".tmp.onnx"
    t0 = time.perf_counter()
    try:
        meta = export_onnx(model, card, args.tile_size, tmp, opset=args.opset)
    except ValueError as e:
        raise UserError("--tile-size / --opset", str(e)) from e
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    print(
        f"exported {args.output}: input (B, 3, {args.tile_size}, {args.tile_size}), output "
        f"(B, {model.vocabulary_size}, {args.tile_size}, {args.tile_size}), opset {args.opset}, "
        f"{os.path.getsize(tmp) / 2**20:.1f} MiB, {time.perf_counter() - t0:.0f} s"
    )
    print(f"  classes: {json.loads(meta['class_names'])}")
    resolution = json.loads(meta["resolution"]) if "resolution" in meta else "unknown"
    print(f"  resolution: {resolution} cm/px")
    if not args.no_verify:
        tile, source = verification_tile(cfg, args.verify_image, args.tile_size)
        res = round_trip(model, tmp, tile)
        agree = 100.0 * res["top1_agreement"]
        print(
            f"round trip on {source}: max |dprob| {res['max_abs_diff']:.2e}, top-1 agreement "
            f"{agree:.3f}%, probabilities sum to {res['prob_sum_range'][0]:.6f}.."
            f"{res['prob_sum_range'][1]:.6f} (onnxruntime {res['onnxruntime_s']:.2f} s, "
            f"PyTorch {res['pytorch_s']:.2f} s); PyTorch predicts {res['classes_predicted']} "
            f"classes there, {100 * res['close_calls']:.2f}% of pixels within 0.01 of the "
            "runner-up"
        )
        if agree < args.min_agreement:
            os.remove(tmp)
            print(
                f"error: VERIFICATION FAILED: onnxruntime agrees with PyTorch on {agree:.3f}% of "
                f"the pixels, below --min-agreement {args.min_agreement}%; {args.output} not "
                "written",
                file=sys.stderr,
            )
            return 1
    os.replace(tmp, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
