#!/usr/bin/env python
"""Export a trained SegCLIP checkpoint to ONNX (onnxruntime, the Deepness QGIS plugin), then
verify the file against PyTorch.

    python tools/export_onnx.py --config-file configs/loveda/segclip_R50.yaml \\
        --weights output/loveda_R50/model_best.pth --tile-size 512 --output model.onnx \\
        [--opset 17] [--classes "road,water,forest"] [--verify-image tile.png] [--no-verify] \\
        [--resolution-cm 30] [--tiles-overlap 15] [--int8 calibration_tiles/]

The file takes ``(B, C, S, S)`` float32 normalised tiles (C = the model's bands, 3 for RGB; B
dynamic, S = --tile-size) and gives ``(B, K, S, S)`` class probabilities summing to 1 (see
:mod:`segclip_d2.deploy.export`), with the Deepness metadata and the checkpoint's model card
in ``metadata_props`` (its metrics only when they were evaluated on the weights it ships).

Resolution (cm/px, what Deepness resamples the raster to): ``--resolution-cm`` when given, else
the GSD in the checkpoint's card, else the config's ``INPUT.GSD_M`` (``--opts INPUT.GSD_M 0.3``).
When none is known the export refuses (exit 2) unless ``--allow-unknown-resolution``.

Verification (on by default): one tile (``--verify-image``, else the first image of the config's
test dataset when it is on disk, else a synthetic aerial tile), centre-cropped or padded to S,
goes through onnxruntime (CPU) and through the PyTorch model in fp32 (its usual fast path). The
tool prints max |difference| of the probabilities and the fraction of pixels with the same top-1
class, and fails (exit 1, the file removed) when that fraction is below ``--min-agreement``
(default 99.9 %). It then runs the whole verification image the way Deepness runs a raster
(black padding to whole tiles, the metadata's overlap, tile centres pasted:
:mod:`segclip_d2.deploy.deepness`) and prints its agreement with the project's own windows
(``OnnxSegmenter``, the ``demo --onnx`` flow) next to the plain round trip.

``--int8 DIR`` also writes ``<output>.int8.onnx``: statically quantised (QDQ, per-channel
int8 weights) with calibration tiles from the images in DIR
(:mod:`segclip_d2.deploy.quantize`), with the same metadata and the same checks (its own
``--min-agreement-int8``). Bad arguments or files: one ``error:`` line, exit 2.
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

from segclip_d2.deploy.export import DEFAULT_TILES_OVERLAP_PERCENT  # noqa: E402
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
    p.add_argument(
        "--resolution-cm", type=float, default=None, help="model resolution, cm/px (see above)"
    )
    p.add_argument(
        "--allow-unknown-resolution",
        action="store_true",
        help="export without a resolution (Deepness then uses its UI default, 3 cm/px)",
    )
    p.add_argument(
        "--tiles-overlap",
        type=int,
        default=None,
        help=f"Deepness tile overlap, percent ({DEFAULT_TILES_OVERLAP_PERCENT})",
    )
    p.add_argument("--int8", default="", metavar="DIR", help="also write an int8 model (see above)")
    p.add_argument(
        "--calibration-tiles", type=int, default=16, help="int8: calibration tiles, at most (16)"
    )
    p.add_argument(
        "--min-agreement-int8", type=float, default=98.0, help="int8 top-1 agreement, %% (98)"
    )
    p.add_argument("--verify-image", default="", help="image used by the checks")
    p.add_argument("--verify", action="store_true", help="run the checks (the default)")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime checks")
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


def model_resolution_cm(args, cfg, card) -> float | None:
    """cm/px written into the file: --resolution-cm, else the card's GSD, else INPUT.GSD_M.

    UserError (exit 2) when none is known and --allow-unknown-resolution is not given.
    """
    card_gsd = (card.get("training") or {}).get("gsd_m")
    known = [("the checkpoint's model card", card_gsd), ("INPUT.GSD_M", cfg.INPUT.GSD_M)]
    known = [(where, float(v) * 100.0) for where, v in known if v and float(v) > 0]
    if args.resolution_cm is not None:
        if not args.resolution_cm > 0:
            raise UserError("--resolution-cm", f"must be positive, got {args.resolution_cm}")
        for where, cm in known:
            if abs(cm - args.resolution_cm) > 1e-6:
                logger.warning(
                    "--resolution-cm %g overrides %s (%g cm/px)", args.resolution_cm, where, cm
                )
        return float(args.resolution_cm)
    if known:
        return round(known[0][1], 6)
    if args.allow_unknown_resolution:
        logger.warning(
            "no resolution written: Deepness will resample the raster to its UI default "
            "(3 cm/px) unless the user sets the model's resolution there"
        )
        return None
    raise UserError(
        args.weights,
        "the model's resolution is unknown (no GSD in its model card, INPUT.GSD_M is 0)",
        "pass --resolution-cm CM (cm/px of the training imagery), or --opts INPUT.GSD_M M "
        "(m/px), or --allow-unknown-resolution to export without one",
    )


def verification_image(cfg, path: str, size: int):
    """(H, W, 3) uint8 RGB image (an N-band model: (H, W, C) of its bands) for the checks and a
    description of where it came from."""
    import cv2

    if list(cfg.INPUT.BANDS) != ["red", "green", "blue"]:
        return band_image(cfg, path, size)
    if path:
        bgr = cv2.imread(path, cv2.IMREAD_COLOR)
        if bgr is None:
            raise UserError(path, "cannot be read as an image", "pass a PNG/JPEG/TIFF tile")
        return bgr[:, :, ::-1], path
    try:
        from detectron2.data import DatasetCatalog

        records = DatasetCatalog.get(cfg.DATASETS.TEST[0]) if len(cfg.DATASETS.TEST) else []
        if records and os.path.isfile(records[0]["file_name"]):
            bgr = cv2.imread(records[0]["file_name"], cv2.IMREAD_COLOR)
            if bgr is not None:
                return bgr[:, :, ::-1], records[0]["file_name"]
    except (KeyError, OSError, ValueError, TypeError):
        pass
    from segclip_d2.data.synthetic import generate_tile

    rgb, _ = generate_tile(0, size=max(2 * size, 64), nodata_prob=0.0)
    return rgb, "synthetic aerial tile (seed 0)"


def model_inputs(cfg) -> tuple[list[str], str]:
    """The model's band names and what their values are (``utils.bands.input_values``)."""
    from segclip_d2.utils.bands import input_values

    bands = [str(b).lower() for b in cfg.INPUT.BANDS]
    return bands, input_values(bands, cfg.MODEL.PIXEL_MEAN)


def band_image(cfg, path: str, size: int):
    """The verification image of an N-band model: ``path`` (its bands chosen by name, as the
    demo chooses them), else the first test image, else a synthetic NIR tile."""
    from segclip_d2.raster.sources import InputError, read_whole

    bands, values = model_inputs(cfg)
    candidates = [path] if path else _first_test_image(cfg)
    for p in candidates:
        try:
            return read_whole(p, None, bands, values), p
        except InputError as e:
            if path:
                raise UserError(path, str(e).removeprefix(f"{path}: ")) from None
    from segclip_d2.data.synthetic import NIR_BANDS, generate_tile

    if bands != list(NIR_BANDS):
        raise UserError(
            "--verify-image", f"none found for a model of the bands {bands}", "pass one"
        )
    image, _ = generate_tile(0, size=max(2 * size, 64), nodata_prob=0.0, nir=True)
    return image, "synthetic aerial NIR tile (seed 0)"


def _first_test_image(cfg) -> list[str]:
    try:
        from detectron2.data import DatasetCatalog

        records = DatasetCatalog.get(cfg.DATASETS.TEST[0]) if len(cfg.DATASETS.TEST) else []
    except (KeyError, OSError, ValueError, TypeError):
        return []
    return [records[0]["file_name"]] if records and os.path.isfile(records[0]["file_name"]) else []


def centre_crop(rgb, size: int, fill):
    """The centre ``size x size`` of ``rgb``, padded with ``fill`` where it is smaller."""
    import numpy as np

    h, w = rgb.shape[:2]
    y0, x0 = max(0, (h - size) // 2), max(0, (w - size) // 2)
    crop = rgb[y0 : y0 + size, x0 : x0 + size]
    tile = np.empty((size, size, rgb.shape[2]), rgb.dtype)
    fill = np.asarray(fill, np.float32)
    tile[:] = fill.round().astype(np.uint8) if rgb.dtype == np.uint8 else fill
    tile[: crop.shape[0], : crop.shape[1]] = crop
    return np.ascontiguousarray(tile)


def round_trip(model, onnx_path: str, tile) -> dict:
    """onnxruntime vs PyTorch fp32 on one (S, S, C) tile."""
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


def deepness_check(onnx_path: str, rgb, reference_path: str | None = None) -> dict:
    """The file run the way Deepness runs a raster (metadata's overlap, threshold, filter) vs
    the project's own windows (``OnnxSegmenter``) of ``reference_path`` (default: the same
    file), on ``rgb`` cut to at most 3 x 3 tiles."""
    from segclip_d2.deploy.deepness import deepness_class_ids, deepness_grid
    from segclip_d2.deploy.onnx_predictor import OnnxSegmenter

    seg = OnnxSegmenter(onnx_path)
    ref = seg if reference_path is None else OnnxSegmenter(reference_path)
    s, meta = seg.tile_size, seg.metadata
    h, w = min(rgb.shape[0], 3 * s), min(rgb.shape[1], 3 * s)
    y0, x0 = (rgb.shape[0] - h) // 2, (rgb.shape[1] - w) // 2
    image = rgb[y0 : y0 + h, x0 : x0 + w]
    ids = deepness_class_ids(
        seg.predict_batch, image, s, meta["tiles_overlap"], meta["seg_thresh"],
        meta["seg_small_segment"],
    )  # fmt: skip
    own = ref.predict_probs(image).argmax(0)
    return {
        "grid": deepness_grid(h, w, s, meta["tiles_overlap"]),
        "size": (h, w),
        "overlap_percent": meta["tiles_overlap"],
        "agreement": float((ids == own).mean()),
    }


def verify(model, path: str, label: str, rgb, source: str, min_agreement: float, ref=None):
    """Print the round trip and the Deepness-style check of ``path``; True when it passes."""
    import numpy as np

    tile = centre_crop(rgb, model_tile_size(path), np.asarray(model.pixel_mean.cpu()).ravel())
    res = round_trip(model, path, tile)
    agree = 100.0 * res["top1_agreement"]
    print(
        f"{label} round trip on {source}: max |dprob| {res['max_abs_diff']:.2e}, top-1 agreement "
        f"{agree:.3f}%, probabilities sum to {res['prob_sum_range'][0]:.6f}.."
        f"{res['prob_sum_range'][1]:.6f} (onnxruntime {res['onnxruntime_s']:.2f} s, "
        f"PyTorch {res['pytorch_s']:.2f} s); PyTorch predicts {res['classes_predicted']} "
        f"classes there, {100 * res['close_calls']:.2f}% of pixels within 0.01 of the runner-up"
    )
    d = deepness_check(path, rgb, ref)
    g = d["grid"]
    print(
        f"{label} Deepness tiling on {source} ({d['size'][0]}x{d['size'][1]} px, overlap "
        f"{d['overlap_percent']}% = {g.overlap} px, stride {g.stride}, black-padded to "
        f"{g.padded_height}x{g.padded_width}, {g.rows}x{g.cols} tiles): agreement with the "
        f"project's own windows{' of the fp32 file' if ref else ''} "
        f"{100 * d['agreement']:.2f}% (plain round trip {agree:.3f}%)"
    )
    if agree < min_agreement:
        print(
            f"error: VERIFICATION FAILED: {label} onnxruntime agrees with PyTorch on {agree:.3f}% "
            f"of the pixels, below the minimum {min_agreement}%; not written",
            file=sys.stderr,
        )
        return False
    return True


def model_tile_size(path: str) -> int:
    import onnx

    return int(onnx.load(path, load_external_data=False).graph.input[0].type.tensor_type.shape
               .dim[2].dim_value)  # fmt: skip


def calibration(args, cfg):
    """The int8 calibration tiles from ``--int8``, read with the model's bands (an N-band
    model's by name, as the demo reads them)."""
    from segclip_d2.deploy.quantize import calibration_tiles

    bands, values = model_inputs(cfg)
    return calibration_tiles(args.int8, args.tile_size, args.calibration_tiles, bands, values)


def int8_path(output: str) -> str:
    root, ext = os.path.splitext(output)
    return f"{root}.int8{ext or '.onnx'}"


def write_checked(path: str, write) -> int:
    """Run ``write(temp)`` on a temp file next to ``path`` (utils.atomic); the temp becomes
    ``path`` when it returns 0 and is removed otherwise (or on an exception)."""
    from segclip_d2.utils.atomic import AtomicFile

    f = AtomicFile(path)
    try:
        code = write(str(f.tmp))
    except BaseException:
        f.abort()
        raise
    if code:
        f.abort()
    else:
        f.commit()
    return code


def write_int8(args, fp32_path: str, tiles, check) -> int:
    """Quantise ``fp32_path`` into ``int8_path(args.output)``; 1 (nothing written) when
    ``check(path)`` fails."""
    from segclip_d2.deploy.quantize import quantize_int8

    out = int8_path(args.output)

    def write(tmp: str) -> int:
        t0 = time.perf_counter()
        excluded = quantize_int8(fp32_path, tmp, tiles)
        print(
            f"int8 {out}: {len(tiles)} calibration tiles from {args.int8}, "
            f"{os.path.getsize(tmp) / 2**20:.1f} MiB, kept in float: {excluded}, "
            f"{time.perf_counter() - t0:.0f} s"
        )
        return 0 if check is None or check(tmp) else 1

    return write_checked(out, write)


def print_summary(args, num_classes: int, meta: dict, path: str, seconds: float) -> None:
    s = args.tile_size
    print(
        f"exported {args.output}: input (B, {len(json.loads(meta['standardization_mean']))}, "
        f"{s}, {s}), output (B, {num_classes}, {s}, {s}), "
        f"opset {args.opset}, {os.path.getsize(path) / 2**20:.1f} MiB, {seconds:.0f} s"
    )
    card = json.loads(meta["segclip_model_card"])
    print(f"  classes: {json.loads(meta['class_names'])}")
    print(
        f"  resolution: {json.loads(meta.get('resolution', 'null')) or 'unknown'} cm/px, "
        f"tiles_overlap {meta['tiles_overlap']}%, seg_thresh {meta['seg_thresh']}, "
        f"seg_small_segment {meta['seg_small_segment']}"
    )
    print(f"  card metrics: {card.get('metrics') or card.get('metrics_note') or 'none'}")


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("segclip_d2").setLevel(logging.INFO)
    if args.tile_size <= 0:
        raise UserError("--tile-size", f"must be positive, got {args.tile_size}")
    overlap = DEFAULT_TILES_OVERLAP_PERCENT if args.tiles_overlap is None else args.tiles_overlap
    if not 0 <= overlap < 100:
        raise UserError("--tiles-overlap", f"must be a percentage in 0..99, got {overlap}")
    if args.int8 and not os.path.isdir(args.int8):
        raise UserError(args.int8, "no such folder of calibration images (--int8)")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise UserError(args.output, f"folder {out_dir} does not exist")
    cfg, model, card = build(args)
    tiles = calibration(args, cfg) if args.int8 else None
    resolution = model_resolution_cm(args, cfg, card)

    from segclip_d2.deploy.export import export_onnx

    if not args.no_verify:
        rgb, source = verification_image(cfg, args.verify_image, args.tile_size)

    def write_fp32(tmp: str) -> int:
        t0 = time.perf_counter()
        try:
            meta = export_onnx(
                model, card, args.tile_size, tmp, opset=args.opset, resolution_cm=resolution,
                tiles_overlap=overlap,
            )  # fmt: skip
        except ValueError as e:
            raise UserError("--tile-size / --opset", str(e)) from e
        print_summary(args, model.vocabulary_size, meta, tmp, time.perf_counter() - t0)
        if args.no_verify:
            return 0
        return 0 if verify(model, tmp, "fp32", rgb, source, args.min_agreement) else 1

    if write_checked(args.output, write_fp32):
        return 1
    if not args.int8:
        return 0

    def check_int8(path: str) -> bool:
        return verify(model, path, "int8", rgb, source, args.min_agreement_int8, args.output)

    return write_int8(args, args.output, tiles, None if args.no_verify else check_int8)


if __name__ == "__main__":
    sys.exit(run_main(main))
