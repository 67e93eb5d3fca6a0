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
from ..predict.blocks import (
    IdArraySink,
    PreviewSink,
    ProbsFn,
    ResampledProbs,
    block_probs,
    check_blend,
    predict_source,
)
from ..raster.writers import (
    ConfidenceWriter,
    Georef,
    GeoTiffWriter,
    ProbabilityWriter,
    confidence_bands,
    staged_png,
)
from .vectorize import DRIVERS, STRIP_PIXELS, Polygonizer, PolygonWriter

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
    block_blend: str = "cosine"  # predict.blocks.BLOCK_BLENDS: crop | flat | linear | cosine
    preview_size: int = 2048
    alpha: float = 0.5
    progress: bool = False

    def __post_init__(self):
        check_blend(self.block_blend)
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"--alpha must be in 0..1, got {self.alpha}")
        if self.min_area < 0 or self.simplify < 0:
            raise ValueError("--min-area and --simplify must be >= 0")


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


# Names the demo writes into its output folder besides the per-input files.
RUN_FILES = ("legend.png", "run_manifest.json")
# How every per-input output name ends (so the demo never takes them for inputs).
OUTPUT_SUFFIXES = (
    "_pred.png",
    "_pred.tif",
    "_probs.tif",
    "_confidence.tif",
    "_color.png",
    "_overlay.png",
    *(f"_pred{ext}" for _, ext in DRIVERS.values()),
)


def is_output_name(name: str) -> bool:
    """Whether a file name is one the demo writes into its output folder."""
    return name in RUN_FILES or name.endswith(OUTPUT_SUFFIXES)


class PolygonSink:
    """Class polygons made from the blocks as they come (no file is read back): complete rows
    are collected and handed to the :class:`~.vectorize.Polygonizer` in strips, top to bottom.
    Holds at most about one row of blocks of class ids and top-1 probabilities."""

    def __init__(self, height, width, transform, writer: PolygonWriter, strip_rows=None):
        self.width, self.writer = width, writer
        self.poly = Polygonizer(height, width, transform, with_conf=True)
        self.strip = strip_rows or max(1, STRIP_PIXELS // max(1, width))
        self.top = 0  # raster row of buffer row 0
        self.ids = np.zeros((0, width), np.uint8)
        self.conf = np.zeros((0, width), np.float32)
        self.filled = np.zeros(0, np.int64)  # pixels written per buffered row
        self.height = height

    def add(self, y, x, ids, rgb, probs=None):
        h, w = ids.shape
        r = y - self.top
        grow = r + h - len(self.filled)
        if grow > 0:
            self.ids = np.concatenate([self.ids, np.zeros((grow, self.width), np.uint8)])
            self.conf = np.concatenate([self.conf, np.zeros((grow, self.width), np.float32)])
            self.filled = np.concatenate([self.filled, np.zeros(grow, np.int64)])
        self.ids[r : r + h, x : x + w] = ids
        self.conf[r : r + h, x : x + w] = confidence_bands(probs, (h, w))[0]
        self.filled[r : r + h] += w
        self._flush(final=False)

    def _flush(self, final: bool) -> None:
        incomplete = np.nonzero(self.filled < self.width)[0]
        n = int(incomplete[0]) if incomplete.size else len(self.filled)
        if n == 0 or (n < self.strip and not (final or self.top + n == self.height)):
            return
        self.writer.add(self.poly.feed(self.ids[:n], self.conf[:n]))
        self.ids, self.conf, self.filled = self.ids[n:], self.conf[n:], self.filled[n:]
        self.top += n

    def finish(self):
        """The polygons of every region, written under a temp name (an AtomicFile)."""
        self._flush(final=True)
        self.writer.add(self.poly.finish())
        return self.writer.finish()


def _raster_writers(src, out_dir: Path, stem: str, names, opts: OutputOptions) -> list:
    """The GeoTIFF writers of one input (class map for rasters, probabilities, confidence)."""
    h, w, georef = src.height, src.width, Georef.of(src)
    cog = opts.cog and src.is_geotiff
    writers = []
    if src.is_geotiff:
        writers.append(GeoTiffWriter(out_dir / names[0], h, w, georef, opts.colors, cog=cog))
    if opts.probabilities:
        path = out_dir / f"{stem}_probs.tif"
        kind = opts.probabilities
        writers.append(ProbabilityWriter(path, h, w, georef, opts.class_names, kind, cog=cog))
    if opts.confidence:
        kind = "float" if opts.probabilities == "float" else "uint8"
        path = out_dir / f"{stem}_confidence.tif"
        writers.append(ConfidenceWriter(path, h, w, georef, kind, cog=cog))
    return writers


def predict_to_outputs(
    src, probs_fn: ProbsFn, out_dir: Path, stem: str, opts: OutputOptions, scale=None
) -> tuple[list[str], int]:
    """Predict ``src`` with ``probs_fn`` (:data:`~segclip_d2.predict.blocks.ProbsFn`) and write
    every requested output for it, block by block; returns (file names, blocks).

    ``scale`` (input pixel size / model GSD) predicts every block resampled by that factor; all
    outputs stay on the input's grid. The outputs are renamed into place together once all of
    them are complete: on any failure (unreadable block, disk full) none of them is, and the
    files of an earlier run stay as they were.
    """
    if scale is not None:
        probs_fn = ResampledProbs(probs_fn, scale)
    out_dir = Path(out_dir)
    names = expected_outputs(stem, src.is_geotiff, opts)
    writers, staged = [], []
    try:
        writers = _raster_writers(src, out_dir, stem, names, opts)
        if src.is_geotiff:
            image = PreviewSink(src.height, src.width, opts.preview_size)
        else:
            image = IdArraySink(src.height, src.width)
        sinks = [*writers, image]
        polygons = None
        if opts.vector:
            vec = PolygonWriter(
                out_dir / f"{stem}_pred{DRIVERS[opts.vector][1]}",
                opts.vector,
                src.crs,
                src.transform,
                opts.class_names,
                opts.min_area,
                opts.simplify,
            )
            polygons = PolygonSink(src.height, src.width, src.transform, vec)
            sinks.append(polygons)
        n = predict_source(
            src, probs_fn, sinks, opts.block_size, opts.margin, opts.progress, opts.block_blend
        )
        while writers:
            staged.append(writers[0].finish())
            writers.pop(0)
        if polygons is not None:
            staged.append(polygons.finish())
        staged += _stage_images(src, image, out_dir, stem, names, opts)
        for f in staged:
            f.commit()
        staged = []
    finally:
        for wr in writers:
            wr.close(False)
        for f in staged:
            f.abort()
    return names, n


def _stage_images(src, image, out_dir: Path, stem: str, names, opts: OutputOptions) -> list:
    """The class-id PNG (ordinary images), the colour map and the overlay, under temp names."""
    staged = []
    try:
        if src.is_geotiff:
            ids, rgb = image.ids, image.rgb  # the preview
        else:
            ids, rgb = image.ids, src.display(src.rgb)
            staged.append(staged_png(out_dir / names[0], ids))
        color = colorize(ids, opts.colors)
        staged.append(staged_png(out_dir / f"{stem}_color.png", color))
        over = overlay(rgb, color, ids, opts.alpha)
        staged.append(staged_png(out_dir / f"{stem}_overlay.png", over))
    except BaseException:
        for f in staged:
            f.abort()
        raise
    return staged


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


def predict_file(predictor, path: str | Path, out_dir: str | Path, **options) -> list[Path]:
    """Predict one image or raster with a loaded predictor and write its outputs into
    ``out_dir``; returns their paths (``<stem>_pred.tif`` first for a GeoTIFF, georeferenced).

    ``predictor``: the one loader's :class:`~segclip_d2.predict.load.Predictor` or an
    :class:`~segclip_d2.deploy.onnx_predictor.OnnxSegmenter` (``predict_probs``, ``class_names``,
    ``colors``). ``options``: :class:`OutputOptions` fields (``probabilities="uint8"``,
    ``vector="gpkg"``, ...). The demo adds input expansion, ranks and the run manifest to this.
    """
    from ..raster.sources import open_source

    opts = OutputOptions(class_names=predictor.class_names, colors=predictor.colors, **options)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src = open_source(path)
    try:
        names, _ = predict_to_outputs(src, block_probs(predictor), out_dir, Path(path).stem, opts)
    finally:
        src.close()
    return [out_dir / n for n in names]
