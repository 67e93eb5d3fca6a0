#!/usr/bin/env python
"""SegCLIP demo: predict class maps of aerial images and GeoTIFFs of any size.

    python demo/demo.py --config-file configs/loveda/segclip_R50.yaml \\
        --input tile.png folder/ "scenes/*.tif" --output out/ \\
        [--tta] [--precision fp32|bf16|fp16] [--classes road,water,forest] [--bands 3,2,1] \\
        [--opts MODEL.WEIGHTS model_final.pth TEST.MODE slide]
    python demo/demo.py --onnx model.onnx --input ... --output out/   # onnxruntime, no torch

Outputs in ``--output``, per input ``<stem>``: ``<stem>_pred.png`` (class ids, uint8, 255 = no
data) or, for rasters, ``<stem>_pred.tif`` (a COG with the input's CRS and transform or GCPs,
nodata 255, a colour table); ``<stem>_color.png`` and ``<stem>_overlay.png`` (previews of at most
``--preview-size`` pixels for rasters); optional probabilities, confidence and polygons
(``--probabilities``, ``--confidence``, ``--vector``); one ``legend.png`` and
``run_manifest.json`` per run. Every flag is defined in :mod:`segclip_d2.cli`.

Both back-ends are one object with ``predict_probs(rgb)``, ``class_names`` and ``colors``
(:func:`load_backend`); everything after loading is one flow: inputs are cut into blocks of
``--block-size`` pixels with ``--block-margin`` of context, blended (``--block-blend``), and fed
to the output writers block by block. Inputs that cannot be read are reported and skipped (exit
1); a bad command line, config, weights or model file, or an input whose bands do not fit the
model (read from its header), is one line ``error: <where>: <what>; <fix>`` and exit 2, found
before anything is written. Disk full fails the input being written and
the run goes on; the manifest still lists every input.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

logger = logging.getLogger("segclip_d2.demo")

# GDAL block cache (MB) while the demo reads and writes rasters.
GDAL_CACHE_MB = 64


def get_parser():
    from segclip_d2.cli import add_demo_arguments
    from segclip_d2.errors import ArgumentParser

    p = ArgumentParser(description="SegCLIP demo on images and GeoTIFFs")
    add_demo_arguments(p)
    return p


def setup_cfg(args):
    import segclip_d2  # noqa: F401  (registers the datasets)
    from segclip_d2.cli import apply_inference_arguments
    from segclip_d2.config import load_config

    cfg = load_config(args.config_file, args.opts)
    apply_inference_arguments(cfg, args)
    import torch

    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE is %s but no GPU is available: CPU", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    return cfg


def load_backend(args):
    """The model of ``--onnx`` (onnxruntime, no torch) or ``--config-file`` (PyTorch): an object
    with ``predict_probs(rgb) -> (K, h, w)``, ``__call__(rgb, valid) -> (ids, probs)``,
    ``class_names``, ``colors``, ``bands`` and ``values`` (the input bands, chosen from each
    raster by name or ``--bands``), ``trained_gsd``, ``model_file``. Every problem is a
    UserError."""
    from segclip_d2.errors import UserError

    if args.onnx:
        from segclip_d2.deploy.onnx_predictor import OnnxSegmenter

        if args.classes or args.tta or args.precision or args.opts:
            raise UserError(
                "--onnx",
                "--classes, --tta, --precision and --opts are PyTorch options",
                "an ONNX model's vocabulary is fixed at export (tools/export_onnx.py --classes)",
            )
        backend = OnnxSegmenter(args.onnx)  # UserError for a missing or foreign file
        check_onnx_output(backend)
        gsd = (backend.card.get("training") or {}).get("gsd_m")
        backend.trained_gsd, backend.model_file = float(gsd) if gsd else None, args.onnx
        return backend
    from segclip_d2.geo.gsd import model_gsd
    from segclip_d2.predict.load import build_predictor
    from segclip_d2.predict.vocabulary import check_custom_classes, dataset_vocabulary

    cfg = setup_cfg(args)
    if args.classes:
        check_custom_classes(cfg, args.classes, len(dataset_vocabulary(cfg)[0]))
    backend = build_predictor(
        cfg=cfg, device=None, precision=None, allow_random_weights=args.allow_random_weights
    )
    if args.classes:
        backend.set_vocabulary(args.classes)
    backend.trained_gsd, backend.model_file = model_gsd(backend.cfg), backend.cfg.MODEL.WEIGHTS
    logger.info("inference: %s", backend)
    return backend


def check_bands(args, backend) -> None:
    """``--bands`` gives as many bands as the model reads (3 or 1 for an RGB model)."""
    from segclip_d2.errors import UserError
    from segclip_d2.raster.sources import check_band_count

    try:
        check_band_count(args.bands, backend.bands)
    except ValueError as e:
        raise UserError("--bands", str(e).removeprefix("--bands ")) from None


def check_onnx_output(backend) -> None:
    """The exported model gives (B, K, S, S) class probabilities for its (B, C, S, S) tiles."""
    import numpy as np

    from segclip_d2.errors import UserError

    s, k, c = backend.tile_size, backend.num_classes, len(backend.bands)
    shape = tuple(backend.predict_batch(np.zeros((1, s, s, c), np.float32)).shape)
    if shape != (1, k, s, s):
        raise UserError(
            backend.path,
            f"the model maps a (1, {c}, {s}, {s}) tile to {shape}, not (1, {k}, {s}, {s}): "
            "probabilities at another resolution than the input, or another number of classes",
            "export the model with tools/export_onnx.py",
        )


def run_settings(args, backend) -> dict:
    """What decides an input's outputs (``--skip-existing`` reuses only outputs made with it):
    the model file (path, size, time), the whole resolved config, the vocabulary, output flags."""
    from segclip_d2.geo.batch import file_identity

    keys = ("bands", "gsd", "alpha", "block_size", "block_margin", "block_blend")
    keys += ("preview_size", "min_area", "simplify")
    cfg = getattr(backend, "cfg", None)
    return {
        **{k: getattr(args, k) for k in keys},
        "model": file_identity(backend.model_file),
        "config": cfg.dump() if cfg is not None else None,
        "classes": list(backend.class_names),
    }


def _exit_on_sigterm(signum, frame):
    # SystemExit unwinds the stack, so partly written outputs' temp files are removed.
    raise SystemExit(128 + signum)


def _main(argv=None) -> int:
    from segclip_d2.cli import output_options
    from segclip_d2.data.visualize import draw_legend
    from segclip_d2.errors import UserError, check_writable_dir
    from segclip_d2.geo.batch import (
        InputRun,
        check_band_choice,
        expand_inputs,
        output_stems,
        shard,
    )
    from segclip_d2.geo.gsd import GsdPolicy
    from segclip_d2.geo.outputs import is_output_name
    from segclip_d2.launch import Launch
    from segclip_d2.predict.blocks import block_probs
    from segclip_d2.utils.atomic import remove_stale_temps

    args = get_parser().parse_args(argv)
    if bool(args.onnx) == bool(args.config_file):
        raise UserError("--config-file/--onnx", "give exactly one", "a config or an ONNX model")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    check_writable_dir(args.output, "--output")
    backend = load_backend(args)
    check_bands(args, backend)
    opts = output_options(args, backend.class_names, backend.colors)
    out_dir = Path(args.output)
    files, missing = expand_inputs(args.input, out_dir, is_output_name)
    for p, why in missing:
        logger.error("input %s: %s", p, why)
    check_band_choice(files, args.bands, backend.bands, backend.values)
    launch = Launch()
    jobs = shard(list(enumerate(zip(files, output_stems(files)))), launch.rank, launch.world_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)  # of killed earlier runs; a running rank's temps stay
    if getattr(backend, "cfg", None) is not None:
        launch.setup(backend.cfg.MODEL.DEVICE)
    title = Path(args.onnx or args.config_file).stem
    run = InputRun(out_dir, block_probs(backend), opts, GsdPolicy(args.gsd, backend.trained_gsd))
    if launch.rank == 0:
        run.write_legend(draw_legend(backend.class_names, backend.colors, title))
    run.bands, run.progress, run.skip_existing = (
        args.bands,
        not args.no_progress,
        args.skip_existing,
    )
    run.model_bands, run.values = backend.bands, backend.values
    run.settings = run_settings(args, backend)
    run.summary = {
        "model_file": backend.model_file,
        "classes": list(backend.class_names),
        "model_gsd_m": backend.trained_gsd,
        "inference": repr(getattr(backend, "inferencer", backend)),
        "world_size": launch.world_size,
        "missing_inputs": [{"input": p, "error": why} for p, why in missing],
    }
    import rasterio

    # GDAL's block cache defaults to 5% of RAM; a small cap keeps GeoTIFF memory flat in size.
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
        records = run.all(jobs, progressive=launch.world_size == 1)
    everything = launch.gather(records)
    launch.close()
    if everything is not None:
        run.write_manifest(everything, final=True)
    failed = [r for r in records if r["status"] == "failed"]
    logger.info(
        "%d input(s) done, %d failed; in %s", len(records) - len(failed), len(failed), out_dir
    )
    return 1 if failed or missing else 0


def main(argv=None) -> int:
    """The demo under the error contract: returns 0, 1 (some inputs failed) or 2 (user error,
    one line on stderr)."""
    from segclip_d2.errors import run_main

    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
