#!/usr/bin/env python
"""SegCLIP demo: predict class maps of aerial images and GeoTIFFs of any size.

    python demo/demo.py --config-file configs/loveda/segclip_R50.yaml \\
        --input tile.png folder/ "scenes/*.tif" --output out/ \\
        [--tta] [--precision fp32|bf16|fp16] [--classes road,water,forest] [--bands 3,2,1] \\
        [--opts MODEL.WEIGHTS model_final.pth TEST.MODE slide]

Outputs in ``--output``, per input ``<stem>``:

- ``<stem>_pred.png``: class ids (uint8, 255 = no data), full resolution (ordinary images);
- ``<stem>_color.png``: the class map in the dataset palette;
- ``<stem>_overlay.png``: the colour map blended over the image;
- ``<stem>_pred.tif`` (GeoTIFF inputs, instead of ``_pred.png``): class ids with the input's CRS
  and transform, nodata 255 for the input's no-data pixels, and a colour table; written window
  by window. For GeoTIFFs ``_color.png``/``_overlay.png`` are previews of at most
  ``--preview-size`` pixels on the long side;

and one ``legend.png`` per run (class id, colour and name of the vocabulary used).

Large inputs are predicted in blocks of ``--block-size`` pixels with ``--block-margin`` pixels of
context; each block goes through the configured ``SegInferencer`` (``TEST.MODE`` whole or slide,
TTA, precision). Inputs that cannot be read (missing, corrupt or truncated, bands that cannot be
told apart) are reported and skipped; the exit code is 1 when any input failed.

A bad command line, config, weights file or output folder is one line ``error: <file or key>:
<what>; <what to do>`` and exit code 2 (:mod:`segclip_d2.errors`; ``--debug`` adds the
traceback), found before the model is built and before anything is written. A model without
trained weights (``MODEL.WEIGHTS`` empty) is refused unless ``--allow-random-weights``. Temp files
left in ``--output`` by killed earlier runs are removed (never those of a running one).

``--onnx model.onnx`` predicts with an exported model (``tools/export_onnx.py``) through
onnxruntime instead: same blocks, GeoTIFF handling and outputs, windows of the model's tile size
inside each block; that path imports neither torch nor detectron2.
"""

from __future__ import annotations

import argparse
import glob
import logging
import signal
import sys
import threading
import time
from pathlib import Path

logger = logging.getLogger("segclip_d2.demo")

# GDAL block cache (MB) while the demo reads and writes rasters.
GDAL_CACHE_MB = 64
# Errors that make one input fail without stopping the others.
_INPUT_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, RuntimeError)


def get_parser() -> argparse.ArgumentParser:
    from segclip_d2.cli import add_inference_arguments
    from segclip_d2.errors import ArgumentParser
    from segclip_d2.geo.outputs import add_output_arguments

    p = ArgumentParser(description="SegCLIP demo on images and GeoTIFFs")
    p.add_argument("--config-file", metavar="FILE", help="model config (YAML); not with --onnx")
    p.add_argument(
        "--onnx", default="", metavar="FILE", help="exported model: run it with onnxruntime"
    )
    p.add_argument(
        "--input", nargs="+", required=True, help="image files, folders or glob patterns"
    )
    p.add_argument("--output", required=True, help="output folder (created if missing)")
    p.add_argument(
        "--classes",
        default="",
        help="comma-separated custom vocabulary (needs MODEL.SEGCLIP.CLASS_HEAD text)",
    )
    add_inference_arguments(p)
    add_output_arguments(p)
    p.add_argument("--bands", default="", help="1-based bands used as R,G,B, e.g. 3,2,1")
    p.add_argument("--block-size", type=int, default=1024, help="pixels per block (default 1024)")
    p.add_argument(
        "--block-margin", type=int, default=128, help="context pixels around each block (128)"
    )
    p.add_argument(
        "--preview-size", type=int, default=2048, help="long side of GeoTIFF previews (2048)"
    )
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the class colours")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--allow-random-weights",
        action="store_true",
        help="run without trained weights (MODEL.WEIGHTS empty): meaningless predictions",
    )
    p.add_argument(
        "--opts",
        default=[],
        nargs=argparse.REMAINDER,
        help="config overrides KEY VALUE ..., e.g. MODEL.WEIGHTS model_final.pth",
    )
    return p


def setup_cfg(args):
    import segclip_d2  # noqa: F401  (registers the datasets)
    from segclip_d2.cli import apply_inference_arguments
    from segclip_d2.config import load_config

    cfg = load_config(args.config_file, args.opts)
    apply_inference_arguments(cfg, args)
    import torch

    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning(
            "MODEL.DEVICE is %s but no GPU is available: running on CPU", cfg.MODEL.DEVICE
        )
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def expand_inputs(patterns) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files of ``patterns`` (files, folders, globs, VRT mosaics; GDAL paths such as
    ``/vsicurl/...`` or ``s3://...`` are kept as given), in order, without duplicates; and
    ``(pattern, reason)`` for patterns that match nothing."""
    from segclip_d2.raster.io import IMAGE_EXTS, is_remote

    files: list[Path | str] = []
    missing: list[tuple[str, str]] = []
    for pat in patterns:
        p = Path(pat)
        if is_remote(pat) and not p.exists():
            found = [str(pat)]  # opened by GDAL; an unreachable source fails as that input
        elif p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTS)
            if not found:
                missing.append((pat, f"folder has no image files ({', '.join(IMAGE_EXTS)})"))
        elif p.exists():
            found = [p]
        elif glob.has_magic(pat):
            found = sorted(Path(f) for f in glob.glob(pat, recursive=True) if Path(f).is_file())
            if not found:
                missing.append((pat, "pattern matches no file"))
        else:
            found = []
            missing.append((pat, "no such file or folder"))
        for f in found:
            if f not in files:
                files.append(f)
    return files, missing


def dataset_vocabulary(cfg) -> tuple[list[str], list[tuple[int, int, int]]]:
    """Class names and colours of the config's dataset (metadata from dataset_facts)."""
    from detectron2.data import MetadataCatalog

    from segclip_d2.errors import UserError, check_datasets

    names = list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN)
    if not names:
        raise UserError(
            "DATASETS.TEST",
            "the config names no dataset, so the class names are unknown",
            "set DATASETS.TEST to the dataset the model was trained on",
        )
    key = "DATASETS.TEST" if cfg.DATASETS.TEST else "DATASETS.TRAIN"
    check_datasets(names[:1], key)
    meta = MetadataCatalog.get(names[0])
    classes = meta.get("stuff_classes", None)
    colors = meta.get("stuff_colors", None)
    if not classes or not colors:
        raise UserError(key, f"dataset {names[0]!r} has no classes/colours", None)
    return list(classes), [tuple(int(v) for v in c) for c in colors]


def build_predictor(cfg):
    """The model in eval mode (weights from MODEL.WEIGHTS when set) and its inferencer."""
    import torch  # noqa: F401
    from detectron2.modeling import build_model

    import segclip_d2.modeling  # noqa: F401  (registers the model parts)
    import segclip_d2.modeling.backbone  # noqa: F401  (CLIP ResNet backbone)
    import segclip_d2.modeling.meta_arch  # noqa: F401  (SegCLIP)
    from segclip_d2.checkpoint.checkpointer import InferenceCheckpointer
    from segclip_d2.errors import check_weights_file
    from segclip_d2.predict import SegInferencer
    from segclip_d2.predict.optimize import optimize_for_inference

    check_weights_file(cfg.MODEL.WEIGHTS, "--opts MODEL.WEIGHTS")
    model = build_model(cfg)
    model.eval()
    if cfg.MODEL.WEIGHTS:
        # a corrupt file or one that does not fit the config is a UserError naming it
        InferenceCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    else:
        logger.warning("MODEL.WEIGHTS is empty: the model is randomly initialised")
    model = optimize_for_inference(model, cfg.MODEL.DEVICE, cfg.TEST.PRECISION)
    inferencer = SegInferencer(cfg)
    return model, inferencer


def process_input(path, stem: str, out_dir: Path, predictor, opts, gsd_policy, args) -> str:
    """Predict one input and write its outputs; returns a one-line summary."""
    from segclip_d2.geo.outputs import predict_to_outputs
    from segclip_d2.raster.io import open_source, parse_bands

    t0 = time.perf_counter()
    src = open_source(path, parse_bands(args.bands))
    try:
        scale = gsd_policy.scale_for(src)
        written, n = predict_to_outputs(src, predictor, out_dir, stem, opts, scale)
    finally:
        src.close()
    dt = time.perf_counter() - t0
    return f"{path}: {src.height}x{src.width}, {n} block(s), {dt:.1f} s -> {', '.join(written)}"


def _exit_on_sigterm(signum, frame):
    # SystemExit unwinds the stack, so partly written outputs' temp files are removed.
    raise SystemExit(128 + signum)


def preflight(args):
    """Every check that needs no model: command line, config, vocabulary, weights file, output
    folder. Returns ``(cfg, classes, colors, custom classes)``; nothing is written."""
    from segclip_d2.errors import (
        UserError,
        check_trained_weights,
        check_weights_file,
        check_writable_dir,
    )
    from segclip_d2.raster.io import parse_bands

    try:
        parse_bands(args.bands)
    except ValueError as e:
        raise UserError("--bands", str(e).removeprefix("--bands "), "e.g. --bands 3,2,1") from None
    if args.block_size <= 0 or args.block_margin < 0 or args.preview_size <= 0:
        raise UserError(
            "--block-size/--block-margin/--preview-size",
            f"got {args.block_size}/{args.block_margin}/{args.preview_size}",
            "sizes must be > 0 and the margin >= 0",
        )
    cfg = setup_cfg(args)
    classes, colors = dataset_vocabulary(cfg)
    custom = [c.strip() for c in args.classes.split(",") if c.strip()]
    if custom and cfg.MODEL.SEGCLIP.CLASS_HEAD != "text":
        raise UserError(
            "--classes",
            f"needs a model with the text-similarity class head (MODEL.SEGCLIP.CLASS_HEAD text); "
            f"{args.config_file} uses {cfg.MODEL.SEGCLIP.CLASS_HEAD!r}, whose classifier is fixed "
            f"to the {len(classes)} training classes",
            "drop --classes or use a text-head model",
        )
    check_weights_file(cfg.MODEL.WEIGHTS, "--opts MODEL.WEIGHTS")
    check_trained_weights(cfg.MODEL.WEIGHTS, args.allow_random_weights)
    check_writable_dir(args.output, "--output")
    return cfg, classes, colors, custom


def _main(argv=None) -> int:
    from segclip_d2.errors import UserError

    args = get_parser().parse_args(argv)
    if bool(args.onnx) == bool(args.config_file):
        raise UserError(
            "--config-file/--onnx", "give exactly one", "a config (PyTorch) or an exported model"
        )
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    if args.onnx:
        return main_onnx(args)

    from segclip_d2.data.visualize import draw_legend, vocabulary_colors
    from segclip_d2.raster.io import remove_stale_temps, write_png

    cfg, classes, colors, custom = preflight(args)

    from segclip_d2.errors import UserError
    from segclip_d2.geo.batch import shard, write_manifest
    from segclip_d2.geo.gsd import GsdPolicy, model_gsd, parse_gsd
    from segclip_d2.geo.outputs import output_options
    from segclip_d2.launch import Launch

    try:
        gsd_option = parse_gsd(args.gsd)
        output_options(args, classes, colors)  # validates the output flags
    except ValueError as e:
        raise UserError("output options", str(e), "see demo/README.md") from None
    launch = Launch()
    files, missing = expand_inputs(args.input)
    failures = [(str(p), why) for p, why in missing]
    for p, why in missing:
        logger.error("input %s: %s", p, why)
    jobs = shard(list(enumerate(zip(files, output_stems(files)))), launch.rank, launch.world_size)

    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)  # of killed earlier runs; a running rank's temps stay
    device = launch.setup(cfg.MODEL.DEVICE)
    model, inferencer = build_predictor(cfg)
    if device != cfg.MODEL.DEVICE:
        model.to(device)
    if custom:
        model.set_vocabulary(custom)
        colors = vocabulary_colors(custom, classes, colors)
        classes = custom
    logger.info("inference: %s", inferencer)

    from segclip_d2.predict.blocks import ClassPredictor

    predictor = ClassPredictor(model.predict_sem_seg_probs, inferencer, device)
    opts = output_options(args, classes, colors)
    gsd_policy = GsdPolicy(gsd_option, model_gsd(cfg))
    if launch.rank == 0:
        write_png(
            out_dir / "legend.png", draw_legend(classes, colors, title=Path(args.config_file).stem)
        )

    iterator = jobs
    if not args.no_progress and len(jobs) > 1:
        from tqdm import tqdm

        iterator = tqdm(jobs, desc="inputs", unit="file")
    import rasterio

    # GDAL's block cache defaults to 5% of RAM; a small cap keeps GeoTIFF memory flat in size.
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
        records = _run_inputs(iterator, out_dir, predictor, opts, gsd_policy, args)
    failures += [(r["input"], r["error"]) for r in records if r["status"] == "failed"]
    everything = launch.gather(records)
    launch.close()
    if everything is not None:
        summary = {
            "config_file": args.config_file,
            "weights": cfg.MODEL.WEIGHTS,
            "classes": list(classes),
            "model_gsd_m": model_gsd(cfg),
            "gsd": args.gsd,
            "inference": repr(inferencer),
            "world_size": launch.world_size,
            "missing_inputs": [{"input": p, "error": why} for p, why in missing],
        }
        write_manifest(out_dir, everything, summary)
    n_ok = sum(1 for r in records if r["status"] != "failed")
    logger.info("%d input(s) done, %d failed; outputs in %s", n_ok, len(failures), out_dir)
    for p, why in failures:
        logger.info("  failed: %s (%s)", p, why)
    return 1 if failures else 0


def main_onnx(args) -> int:
    """``--onnx``: the exported model through onnxruntime (no torch / detectron2 import); the
    same blocks, outputs (probabilities, confidence, COG, polygons), GSD handling and manifest as
    the PyTorch path, in one process."""
    from segclip_d2.data.visualize import draw_legend
    from segclip_d2.deploy.onnx_predictor import OnnxSegmenter
    from segclip_d2.errors import UserError, check_writable_dir
    from segclip_d2.geo.batch import write_manifest
    from segclip_d2.geo.gsd import GsdPolicy, parse_gsd
    from segclip_d2.geo.outputs import output_options
    from segclip_d2.raster.io import parse_bands, remove_stale_temps, write_png

    try:
        parse_bands(args.bands)
    except ValueError as e:
        raise UserError("--bands", str(e).removeprefix("--bands "), "e.g. --bands 3,2,1") from None
    if args.classes or args.tta or args.precision or args.opts:
        raise UserError(
            "--onnx",
            "--classes, --tta, --precision and --opts are PyTorch options",
            "an ONNX model's vocabulary is fixed at export (tools/export_onnx.py --classes)",
        )
    if args.block_size <= 0 or args.block_margin < 0 or args.preview_size <= 0:
        raise UserError(
            "--block-size/--block-margin/--preview-size",
            f"got {args.block_size}/{args.block_margin}/{args.preview_size}",
            "sizes must be > 0 and the margin >= 0",
        )
    check_writable_dir(args.output, "--output")
    predictor = OnnxSegmenter(args.onnx)  # UserError for a missing or foreign file
    try:
        gsd_option = parse_gsd(args.gsd)
        opts = output_options(args, predictor.class_names, predictor.colors)
    except ValueError as e:
        raise UserError("output options", str(e), "see demo/README.md") from None
    trained_gsd = (predictor.card.get("training") or {}).get("gsd_m")
    gsd_policy = GsdPolicy(gsd_option, float(trained_gsd) if trained_gsd else None)
    logger.info("inference: %s", predictor)
    files, missing = expand_inputs(args.input)
    failures = [(str(p), why) for p, why in missing]
    for p, why in missing:
        logger.error("input %s: %s", p, why)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)
    title = Path(args.onnx).stem
    write_png(out_dir / "legend.png", draw_legend(predictor.class_names, predictor.colors, title))
    import rasterio

    jobs = list(enumerate(zip(files, output_stems(files))))
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
        records = _run_inputs(jobs, out_dir, predictor, opts, gsd_policy, args)
    failures += [(r["input"], r["error"]) for r in records if r["status"] == "failed"]
    summary = {
        "onnx": args.onnx,
        "classes": list(predictor.class_names),
        "model_gsd_m": gsd_policy.trained_gsd,
        "gsd": args.gsd,
        "inference": repr(predictor),
        "world_size": 1,
        "missing_inputs": [{"input": p, "error": why} for p, why in missing],
    }
    write_manifest(out_dir, records, summary)
    n_ok = sum(1 for r in records if r["status"] != "failed")
    logger.info("%d input(s) done, %d failed; outputs in %s", n_ok, len(failures), out_dir)
    return 1 if failures else 0


def output_stems(files) -> list[str]:
    """One output name per input: the file's stem, numbered when already used in this run."""
    stems, used = [], {}
    for path in files:
        stem = Path(str(path)).stem
        if stem in used:
            used[stem] += 1
            new = f"{stem}_{used[stem]}"
            logger.warning("%s: output name already used in this run, writing %s_*", path, new)
            stem = new
        else:
            used[stem] = 0
        stems.append(stem)
    return stems


def _run_inputs(jobs, out_dir, predictor, opts, gsd_policy, args) -> list[dict]:
    """Process every ``(index, (path, stem))``; returns one manifest record per input."""
    from segclip_d2.geo.outputs import expected_outputs, outputs_complete
    from segclip_d2.raster.io import is_raster_path

    records = []
    for index, (path, stem) in jobs:
        names = expected_outputs(stem, is_raster_path(path), opts)
        rec = {"index": index, "input": str(path), "outputs": names, "error": None}
        t0 = time.perf_counter()
        if args.skip_existing and outputs_complete(out_dir, names):
            logger.info("%s: outputs complete, skipped (--skip-existing)", path)
            rec["status"] = "skipped"
        else:
            try:
                logger.info(
                    "%s", process_input(path, stem, out_dir, predictor, opts, gsd_policy, args)
                )
                rec["status"] = "done"
            except _INPUT_ERRORS as e:
                msg = str(e) if str(path) in str(e) else f"{path}: {e}"
                logger.error("failed: %s", msg)
                rec.update(status="failed", error=str(e))
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        records.append(rec)
    return records


def main(argv=None) -> int:
    """The demo under the error contract: returns 0, 1 (some inputs failed) or 2 (user error,
    one line on stderr)."""
    from segclip_d2.errors import run_main

    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
