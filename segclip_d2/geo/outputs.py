"""Everything the demo writes for one input, block by block: the class map (COG for rasters),
class probabilities, confidence, polygons and previews.

:class:`OutputOptions` holds the choices; :func:`expected_outputs` names the files they produce
(``--skip-existing`` checks them); :func:`predict_to_outputs` runs one input. Every file is
written to a hidden temp name and renamed into place only when complete.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.dataset_facts import IGNORE_LABEL
from ..data.visualize import colorize, overlay
from ..predict.blocks import IdArraySink, PreviewSink, ResampledPredictor, predict_source
from ..raster.io import (
    ConfidenceWriter,
    GeoTiffWriter,
    ProbabilityWriter,
    confidence_bands,
    write_png,
)
from ..utils.atomic import temp_name
from .vectorize import DRIVERS, write_polygons

logger = logging.getLogger(__name__)


@dataclass
class OutputOptions:
    class_names: Sequence[str]
    colors: Sequence[Sequence[int]]
    probabilities: str | None = None  # None | "uint8" | "float"
    confidence: bool = False
    cog: bool = True  # raster outputs of GeoTIFF inputs as COG
    vector: str | None = None  # None | "gpkg" | "geojson"
    min_area: float = 0.0
    simplify: float = 0.0
    block_size: int = 1024
    margin: int = 128
    block_blend: str = "cosine"  # "cosine" | "linear" | "crop"
    preview_size: int = 2048
    alpha: float = 0.5
    progress: bool = False


def expected_outputs(stem: str, is_raster: bool, opts: OutputOptions) -> list[str]:
    """File names written for one input (all of them exist only after a complete run)."""
    names = [f"{stem}_pred.tif" if is_raster else f"{stem}_pred.png"]
    if opts.probabilities:
        names.append(f"{stem}_probs.tif")
    if opts.confidence:
        names.append(f"{stem}_confidence.tif")
    if opts.vector:
        names.append(f"{stem}_pred{DRIVERS[opts.vector][1]}")
    names += [f"{stem}_color.png", f"{stem}_overlay.png"]
    return names


class _Top1Sink:
    """The top-1 probability of every pixel in memory (plain images, for polygon confidence)."""

    def __init__(self, height, width):
        self.top1 = np.zeros((height, width), np.float32)

    def add(self, y, x, ids, rgb, probs=None):
        h, w = ids.shape
        self.top1[y : y + h, x : x + w] = confidence_bands(probs, (h, w))[0]


def predict_to_outputs(
    src, predictor, out_dir: Path, stem: str, opts: OutputOptions, scale: float | None = None
) -> tuple[list[str], int]:
    """Predict ``src`` and write every requested output for it; returns (file names, blocks).

    ``scale`` (input pixel size / model GSD) predicts every block resampled by that factor; all
    outputs stay on the input's grid.
    """
    import rasterio

    if scale is not None:
        predictor = ResampledPredictor(predictor, scale)
    out_dir = Path(out_dir)
    h, w = src.height, src.width
    crs, transform = src.crs, src.transform
    raster = src.is_geotiff
    cog = opts.cog and raster
    names = expected_outputs(stem, raster, opts)
    writers, sinks = [], []
    ok = False
    conf_tmp: Path | None = None
    try:
        if raster:
            writers.append(
                GeoTiffWriter(out_dir / names[0], h, w, crs, transform, opts.colors, cog=cog)
            )
            preview = PreviewSink(h, w, opts.preview_size)
            sinks.append(preview)
        else:
            ids_sink = IdArraySink(h, w)
            sinks.append(ids_sink)
        if opts.probabilities:
            writers.append(
                ProbabilityWriter(
                    out_dir / f"{stem}_probs.tif",
                    h,
                    w,
                    crs,
                    transform,
                    opts.class_names,
                    opts.probabilities,
                    cog=cog,
                )
            )
        conf_writer = None
        if opts.confidence:
            conf_kind = "float" if opts.probabilities == "float" else "uint8"
            conf_writer = ConfidenceWriter(
                out_dir / f"{stem}_confidence.tif", h, w, crs, transform, conf_kind, cog=cog
            )
            writers.append(conf_writer)
        top1 = None
        if opts.vector and not opts.confidence:
            if raster:  # a hidden confidence raster, removed after vectorising
                conf_tmp = temp_name(out_dir / f"{stem}_vecconf.tif")
                conf_writer = ConfidenceWriter(conf_tmp, h, w, crs, transform, "uint8")
                writers.append(conf_writer)
            else:
                top1 = _Top1Sink(h, w)
                sinks.append(top1)
        n = predict_source(
            src,
            predictor,
            writers + sinks,
            block_size=opts.block_size,
            margin=opts.margin,
            progress=opts.progress,
            blend=opts.block_blend,
        )
        for wr in writers:
            wr.close(True)
        writers = []
        if opts.vector:
            vec_path = out_dir / f"{stem}_pred{DRIVERS[opts.vector][1]}"
            if raster:
                conf_path = conf_tmp or out_dir / f"{stem}_confidence.tif"
                with rasterio.open(out_dir / names[0]) as cls_ds, rasterio.open(conf_path) as cf:
                    write_polygons(
                        vec_path,
                        opts.vector,
                        h,
                        w,
                        crs,
                        transform,
                        opts.class_names,
                        lambda y, n_: _read_rows(cls_ds, 1, y, n_),
                        lambda y, n_: _read_prob(cf, 1, y, n_),
                        opts.min_area,
                        opts.simplify,
                    )
            else:
                if top1 is None:
                    with rasterio.open(out_dir / f"{stem}_confidence.tif") as cf:
                        conf = _read_prob(cf, 1, 0, h)
                else:
                    conf = top1.top1
                write_polygons(
                    vec_path,
                    opts.vector,
                    h,
                    w,
                    None,
                    None,
                    opts.class_names,
                    lambda y, n_: ids_sink.ids[y : y + n_],
                    lambda y, n_: conf[y : y + n_],
                    opts.min_area,
                    opts.simplify,
                )
        if raster:
            ids, rgb = preview.ids, preview.rgb
        else:
            ids, rgb = ids_sink.ids, src.rgb
            write_png(out_dir / names[0], ids)
        color = colorize(ids, opts.colors)
        write_png(out_dir / f"{stem}_color.png", color)
        write_png(out_dir / f"{stem}_overlay.png", overlay(rgb, color, ids, opts.alpha))
        ok = True
    finally:
        for wr in writers:
            wr.close(False)
        if conf_tmp is not None and conf_tmp.exists():
            conf_tmp.unlink()
        if not ok:
            logger.debug("%s: outputs discarded after a failure", stem)
    return names, n


def _read_rows(ds, band: int, y: int, n: int) -> np.ndarray:
    from rasterio.windows import Window

    return ds.read(band, window=Window(0, y, ds.width, n))


def _read_prob(ds, band: int, y: int, n: int) -> np.ndarray:
    """Probabilities of rows ``y .. y + n`` of a probability / confidence raster as float32."""
    v = _read_rows(ds, band, y, n)
    if v.dtype == np.uint8:
        return v.astype(np.float32) / 255.0
    return np.nan_to_num(v.astype(np.float32), nan=0.0)


def outputs_complete(out_dir: Path, names: Sequence[str]) -> bool:
    """Whether every output exists (atomic writes: an existing name is a finished file)."""
    return all(os.path.isfile(Path(out_dir) / n) for n in names)


__all__ = [
    "IGNORE_LABEL",
    "OutputOptions",
    "expected_outputs",
    "outputs_complete",
    "predict_to_outputs",
]


def add_output_arguments(parser) -> None:
    """The demo's output flags (probabilities, confidence, COG, polygons, GSD, resuming)."""
    import argparse

    parser.add_argument(
        "--probabilities",
        nargs="?",
        const="uint8",
        default=None,
        choices=("uint8", "float"),
        help="write <stem>_probs.tif: K bands of class probability, uint8 0-255 (default) "
        "or float (float16)",
    )
    parser.add_argument(
        "--confidence",
        action="store_true",
        help="write <stem>_confidence.tif: top-1 probability and margin top-1 minus top-2",
    )
    parser.add_argument(
        "--cog",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="GeoTIFF outputs as Cloud-Optimized GeoTIFFs (default; --no-cog: plain tiled)",
    )
    parser.add_argument(
        "--vector",
        choices=sorted(DRIVERS),
        default=None,
        help="write class polygons <stem>_pred.gpkg / .geojson (class_id, class_name, area_m2, "
        "mean_confidence)",
    )
    parser.add_argument(
        "--min-area", type=float, default=0.0, metavar="M2", help="drop smaller polygons (m²)"
    )
    parser.add_argument(
        "--simplify",
        type=float,
        default=0.0,
        metavar="TOL",
        help="simplify polygons with this tolerance (CRS units)",
    )
    parser.add_argument(
        "--gsd",
        default="auto",
        help="auto (resample to the model's training GSD when the raster's differs by >10%%), "
        "off, or a pixel size in metres to predict at",
    )
    parser.add_argument(
        "--block-blend",
        choices=("cosine", "linear", "crop"),
        default="cosine",
        help="how neighbouring blocks' overlapping margins are combined: tapered weights "
        "(cosine, default; linear) or crop (keep each block's centre)",
    )
    parser.add_argument(
        "--skip-existing",
        action="store_true",
        help="skip inputs whose outputs are all complete (resume a killed run)",
    )


def output_options(args, class_names, colors) -> OutputOptions:
    """:class:`OutputOptions` from the parsed demo arguments."""
    if args.min_area < 0 or args.simplify < 0:
        raise ValueError("--min-area and --simplify must be >= 0")
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
