#!/usr/bin/env python
"""Prepare your own GeoTIFF scenes and labels as a dataset SegCLIP trains on.

    python datasets/prepare_custom.py --images SCENES --labels LABELS --classes classes.yaml \
        --name NAME --dst $DETECTRON2_DATASETS [--tile-size 1024] [--val-fraction 0.1]

SCENES: folders, globs or files of rasters GDAL reads (any number of bands; uint8, uint16 or
float), all in one CRS and at one pixel size. LABELS: label rasters (matched to scenes by file
stem, or one mosaic covering them; resampled nearest onto each scene's grid) or ONE vector file
(GeoPackage, GeoJSON, Shapefile) whose polygons are rasterised onto each scene's grid, the class
read from the attribute named by classes.yaml's 'field:'. classes.yaml: see
segclip_d2/data/custom.py. Unlabelled pixels are ignored in training and evaluation.

Split: by SCENE (whole scenes go to val; the default with 2+ scenes) or by spatial BLOCK (blocks
of --block-tiles x --block-tiles tiles go to val; the default with one scene), never by tile.

Writes <dst>/NAME/{train,val}/images/*.tif (all bands, georeferenced), .../labels/*.png (train
ids, 255 = ignore) and NAME/dataset.yaml (classes, colours, prompts, bands, per-band mean/std of
the training tiles, GSD, the split), registered as NAME_train / NAME_val. Train with:

    python train_net.py --config-file configs/custom/segclip_cpu.yaml DATASETS.CUSTOM NAME
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segclip_d2.data.custom import read_classes_file  # noqa: E402
from segclip_d2.data.custom_labels import (  # noqa: E402
    RASTER_SUFFIXES,
    VECTOR_SUFFIXES,
    check_polygons_inside,
    check_same_grid,
    expand_paths,
    match_label_rasters,
    open_scene,
    raster_label_on_grid,
    rasterize_labels,
    read_vector_labels,
)
from segclip_d2.data.custom_prepare import (  # noqa: E402
    SPLIT_METHODS,
    DatasetWriter,
    assign_splits,
    dataset_record,
    write_scene_tiles,
)
from segclip_d2.data.dataset_facts import BUILTIN_KEYS  # noqa: E402
from segclip_d2.errors import ArgumentParser, UserError, check_writable_dir, run_main  # noqa: E402
from segclip_d2.geo.gsd import pixel_size_m  # noqa: E402

logger = logging.getLogger("prepare_custom")


def parse_args(argv=None) -> argparse.Namespace:
    doc = __doc__.split("\n\n")
    parser = ArgumentParser(
        description="\n\n".join(doc[:4]), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", nargs="+", required=True, help="scene folders, globs or files")
    parser.add_argument(
        "--labels",
        nargs="+",
        required=True,
        help="label rasters (folder/glob/files) or 1 vector file",
    )
    parser.add_argument("--classes", required=True, type=Path, help="classes.yaml")
    parser.add_argument("--name", required=True, help="dataset name (letters, digits, _ and -)")
    parser.add_argument(
        "--dst", required=True, type=Path, help="datasets root (DETECTRON2_DATASETS)"
    )
    parser.add_argument("--tile-size", type=int, default=1024, help="tile side in pixels")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of scenes/blocks")
    parser.add_argument(
        "--split",
        choices=SPLIT_METHODS,
        default="auto",
        help="auto: scene with 2+ scenes, else block",
    )
    parser.add_argument(
        "--block-tiles", type=int, default=4, help="block side in tiles (block split)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the val draw")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset NAME")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", args.name) or args.name in BUILTIN_KEYS:
        raise UserError(
            "--name", f"{args.name!r} is not a usable name", "use letters, digits, _, -"
        )
    if args.tile_size < 32 or args.block_tiles < 1 or not 0 < args.val_fraction < 1:
        raise UserError(
            "command line", "need --tile-size >= 32, --block-tiles >= 1, 0 < --val-fraction < 1"
        )
    return args


def load_labels(args, classes, scenes):
    """scene stem -> function giving its train-id label (H, W); all checks done up front that
    need no pixels (vector values, polygons outside every scene, raster matching)."""
    labels = [Path(p) for p in args.labels]
    if len(labels) == 1 and labels[0].suffix.lower() in VECTOR_SUFFIXES:
        vec = read_vector_labels(labels[0], classes, scenes[0].crs)
        check_polygons_inside(vec, scenes)
        return {s.stem: (lambda s=s: rasterize_labels(vec, s)) for s in scenes}
    rasters = expand_paths(args.labels, RASTER_SUFFIXES, "--labels")
    matched = match_label_rasters(scenes, rasters)
    return {s.stem: (lambda s=s: raster_label_on_grid(matched[s.stem], s, classes)) for s in scenes}


def prepare(args) -> Path:
    classes = read_classes_file(args.classes)
    paths = expand_paths(args.images, RASTER_SUFFIXES, "--images")
    scenes = [open_scene(p, classes.bands) for p in paths]
    check_same_grid(scenes)
    label_of = load_labels(args, classes, scenes)
    tiles, split = assign_splits(
        scenes, args.tile_size, args.split, args.val_fraction, args.block_tiles, args.seed
    )
    writer = DatasetWriter(args.dst, args.name, args.overwrite)
    try:
        for scene in scenes:
            logger.info(
                "%s: %d x %d px, %d bands", scene.path, scene.width, scene.height, scene.count
            )
            write_scene_tiles(scene, label_of[scene.stem](), tiles, writer, classes.bands)
        gsd = pixel_size_m(scenes[0].crs, scenes[0].transform)
        record = dataset_record(args.name, classes, writer, split, gsd, scenes, args.tile_size)
        return writer.commit(record)
    except BaseException:
        writer.abort()
        raise


def _main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    check_writable_dir(args.dst, "--dst")
    start = time.perf_counter()
    out = prepare(args)
    print(
        f"{out}: ready in {time.perf_counter() - start:.1f} s; "
        f"train with DATASETS.CUSTOM {args.name}"
    )
    return 0


def main(argv=None) -> int:
    """Under the error contract: 0, or 2 with one line ``error: ...`` on stderr."""
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
