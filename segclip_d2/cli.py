"""Command-line flags, defined here once: the inference flags shared by train_net.py (evaluation)
and demo/demo.py, and the demo's own (inputs, blocks, outputs, GSD, resuming). Values are checked
as they are parsed, so a bad value is one line ``error: command line: argument --X: ...`` and
exit 2 before anything is loaded (``--debug`` comes with :class:`segclip_d2.errors.ArgumentParser`).

Imports without torch (``demo.py --onnx`` runs without it).
"""

from __future__ import annotations

import argparse
import math


def add_inference_arguments(parser) -> None:
    """``--tta`` and ``--precision``, the command-line form of ``TEST.TTA.ENABLED`` and
    ``TEST.PRECISION`` (train_net.py's evaluation and demo/demo.py)."""
    parser.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation (sets TEST.TTA.ENABLED True; views from TEST.TTA.*)",
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default=None,
        help="inference precision (sets TEST.PRECISION, default auto: bf16 where the CPU or GPU "
        "computes it natively, fp16 on older GPUs, else fp32); fp16 on a CPU runs bf16",
    )
    parser.add_argument(
        "--allow-text-mismatch",
        action="store_true",
        help="use a CLIP text encoder that does not reproduce the checkpoint's stored class "
        "embeddings (sets MODEL.SEGCLIP.TEXT.ALLOW_MISMATCH True)",
    )


def apply_inference_arguments(cfg, args) -> None:
    """Write the flags of :func:`add_inference_arguments` into ``cfg`` (not frozen yet)."""
    if getattr(args, "tta", False):
        cfg.TEST.TTA.ENABLED = True
    if getattr(args, "precision", None):
        cfg.TEST.PRECISION = args.precision
    if getattr(args, "allow_text_mismatch", False):
        cfg.MODEL.SEGCLIP.TEXT.ALLOW_MISMATCH = True


# ------------------------------------------------------------------------------- value types
def _number(text: str, kind=float) -> float:
    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return v


def positive_int(text: str) -> int:
    v = _number(text, int)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return v


def non_negative_int(text: str) -> int:
    v = _number(text, int)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return v


def non_negative(text: str) -> float:
    v = _number(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return v


def unit_interval(text: str) -> float:
    v = _number(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in 0..1, got {text!r}")
    return v


def gsd_value(text: str):
    from .geo.gsd import parse_gsd

    try:
        return parse_gsd(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--gsd ")) from None


def band_list(text: str):
    from .raster.sources import parse_bands

    try:
        return parse_bands(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--bands ")) from None


def class_list(text: str) -> list[str]:
    """``"road, water"`` -> ``["road", "water"]``; the same name twice is refused."""
    names = [c.strip() for c in text.split(",") if c.strip()]
    seen: dict[str, str] = {}
    for n in names:
        key = " ".join(n.lower().split())
        if key in seen:
            raise argparse.ArgumentTypeError(f"class {n!r} given twice (as {seen[key]!r})")
        seen[key] = n
    return names


# ------------------------------------------------------------------------------- the demo
def add_demo_arguments(p) -> None:
    """Every flag of demo/demo.py."""
    _add_model_arguments(p)
    _add_block_arguments(p)
    _add_output_arguments(p)


def _add_model_arguments(p) -> None:
    p.add_argument("--config-file", metavar="FILE", help="model config (YAML); not with --onnx")
    p.add_argument(
        "--onnx", default="", metavar="FILE", help="exported model: run with onnxruntime"
    )
    p.add_argument("--input", nargs="+", required=True, help="image files, folders or globs")
    p.add_argument("--output", required=True, help="output folder (created if missing)")
    p.add_argument(
        "--classes",
        type=class_list,
        default=[],
        help="comma-separated custom vocabulary (needs MODEL.SEGCLIP.CLASS_HEAD text)",
    )
    add_inference_arguments(p)
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


def _add_block_arguments(p) -> None:
    from .predict.blocks import BLOCK_BLENDS

    p.add_argument(
        "--bands",
        type=band_list,
        default=None,
        help="1-based band numbers in the model's band order: R,G,B for an RGB model (e.g. "
        "3,2,1), one per input band for an N-band model (default: by the raster's band "
        "descriptions)",
    )
    p.add_argument("--block-size", type=positive_int, default=1024, help="pixels per block (1024)")
    p.add_argument(
        "--block-margin", type=non_negative_int, default=128, help="context around blocks (128)"
    )
    p.add_argument(
        "--block-blend",
        choices=BLOCK_BLENDS,
        default="cosine",
        help="how overlapping block margins combine: crop (keep each block's centre) or a taper "
        "like TEST.SLIDE.BLEND (flat, linear, cosine: default)",
    )
    p.add_argument(
        "--preview-size", type=positive_int, default=2048, help="long side of raster previews"
    )
    p.add_argument(
        "--gsd",
        type=gsd_value,
        default="auto",
        help="auto (resample to the model's training GSD when the raster's differs by >10%%), "
        "off, or a pixel size in metres to predict at",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_output_arguments(p) -> None:
    from .geo.vectorize import DRIVERS

    p.add_argument("--alpha", type=unit_interval, default=0.5, help="overlay opacity, 0..1 (0.5)")
    p.add_argument(
        "--probabilities",
        nargs="?",
        const="uint8",
        default=None,
        choices=("uint8", "float"),
        help="write <stem>_probs.tif: K bands of class probability, uint8 0-255 (default) "
        "or float (float16)",
    )
    p.add_argument(
        "--confidence",
        action="store_true",
        help="write <stem>_confidence.tif: top-1 probability and margin top-1 minus top-2",
    )
    p.add_argument(
        "--cog",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="GeoTIFF outputs as Cloud-Optimized GeoTIFFs (default; --no-cog: plain tiled)",
    )
    p.add_argument(
        "--vector",
        choices=sorted(DRIVERS),
        default=None,
        help="write class polygons <stem>_pred.gpkg / .geojson (class_id, class_name, area_m2, "
        "mean_confidence)",
    )
    p.add_argument(
        "--min-area",
        type=non_negative,
        default=0.0,
        metavar="M2",
        help="drop smaller polygons (m²)",
    )
    p.add_argument(
        "--simplify",
        type=non_negative,
        default=0.0,
        metavar="TOL",
        help="simplify polygons (CRS units)",
    )
    p.add_argument(
        "--skip-existing",
        action="store_true",
        help="skip inputs whose outputs are complete and were made with the same model and "
        "settings (as the run manifest records): resume a killed run",
    )


def output_options(args, class_names, colors):
    """:class:`~segclip_d2.geo.outputs.OutputOptions` from the parsed demo arguments."""
    from .geo.outputs import OutputOptions

    return OutputOptions(
        class_names=list(class_names),
        colors=list(colors),
        probabilities=args.probabilities,
        confidence=args.confidence,
        cog=args.cog,
        vector=args.vector,
        min_area=args.min_area,
        simplify=args.simplify,
        block_size=args.block_size,
        margin=args.block_margin,
        block_blend=args.block_blend,
        preview_size=args.preview_size,
        alpha=args.alpha,
        progress=not args.no_progress,
    )
