#!/usr/bin/env python
"""Sample "own data" to try the own-data path end to end: georeferenced 4-band scenes and a
GeoPackage of labelled polygons, as a user brings them from QGIS.

    python datasets/make_sample_scenes.py --dst samples/ [--scenes 4 --size 2048 --gsd 0.3]
    python datasets/prepare_custom.py --images samples/scenes --labels samples/labels.gpkg \\
        --classes samples/classes.yaml --name samples --dst "$DETECTRON2_DATASETS"
    python train_net.py --config-file configs/custom/segclip_cpu.yaml DATASETS.CUSTOM samples

Writes into ``--dst``:

* ``scenes/scene_<i>.tif``: ``--scenes`` scenes of ``--size`` px, bands red, green, blue and
  near-infrared (band descriptions), ``--dtype`` uint16 (12-bit values, as many satellite and
  airborne cameras deliver) or uint8, in UTM zone 33N at ``--gsd`` m/px, side by side. The
  pixels are the synthetic aerial generator's (:mod:`segclip_d2.data.synthetic`: fields, forest,
  water, roads, buildings; NIR bright on vegetation, dark on water);
* ``labels.gpkg``: the generator's labels as polygons (layer ``labels``, attribute
  ``class_id``), simplified by half a pixel as hand-drawn outlines are; a random
  ``--unlabelled`` fraction of the polygons is left out, as labellers leave areas out, so those
  pixels are unlabelled (ignored in training);
* ``classes.yaml``: the classes, their colours, prompts and ``class_id`` values, and the bands.

Nothing is overwritten: an existing ``--dst`` with any of these is refused (one line, exit 2).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from segclip_d2.errors import UserError, run_main  # noqa: E402

CRS = "EPSG:32633"
ORIGIN = (500000.0, 5100000.0)  # west, north of scene 0 (metres, UTM 33N)
BANDS = ("red", "green", "blue", "nir")
FIELD = "class_id"
# 12-bit sensor values from the generator's 8-bit ones: value * 16 + dark offset
UINT16_GAIN, UINT16_OFFSET = 16, 60
PROMPTS = {
    "background": ["bare ground and grass", "open land"],
    "building": ["a roof of a building", "houses from above"],
    "road": ["a road", "a paved street"],
    "water": ["a lake or river", "water"],
    "barren": ["bare soil", "barren land"],
    "forest": ["a forest", "tree canopy"],
    "agriculture": ["farmland", "crop fields"],
}


def get_parser() -> argparse.ArgumentParser:
    from segclip_d2.errors import ArgumentParser

    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dst", required=True, help="folder to write (must not hold sample files)")
    p.add_argument("--scenes", type=int, default=4, help="number of scenes (4)")
    p.add_argument("--size", type=int, default=2048, help="scene size in pixels (2048)")
    p.add_argument("--gsd", type=float, default=0.3, help="ground sampling distance, m/px (0.3)")
    p.add_argument("--dtype", choices=("uint16", "uint8"), default="uint16")
    p.add_argument("--unlabelled", type=float, default=0.1, help="polygons left out (0.1)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (0)")
    return p


def scene_transform(i: int, size: int, gsd: float):
    """Scene ``i``'s transform: scenes side by side west to east, 10 px apart."""
    from rasterio.transform import from_origin

    return from_origin(ORIGIN[0] + i * (size + 10) * gsd, ORIGIN[1], gsd, gsd)


def write_scene(path: Path, image: np.ndarray, transform, dtype: str) -> None:
    """(H, W, 4) uint8 -> a tiled, deflate-compressed GeoTIFF with named bands."""
    import rasterio

    from segclip_d2.utils.atomic import atomic_output

    data = image.transpose(2, 0, 1)
    if dtype == "uint16":
        data = data.astype(np.uint16) * UINT16_GAIN + UINT16_OFFSET
    profile = dict(
        driver="GTiff", width=image.shape[1], height=image.shape[0], count=len(BANDS),
        dtype=dtype, crs=CRS, transform=transform, tiled=True, blockxsize=256, blockysize=256,
        compress="deflate",
    )  # fmt: skip
    with atomic_output(path) as tmp, rasterio.open(tmp, "w", **profile) as ds:
        ds.write(data)
        for b, name in enumerate(BANDS, start=1):
            ds.set_band_description(b, name)


def label_polygons(label: np.ndarray, transform, gsd: float, keep, rng) -> tuple[list, list]:
    """(WKB geometries, class ids): the labelled regions of ``label`` (255 = none) as polygons
    in map coordinates, simplified by half a pixel; each kept with probability ``keep``."""
    import shapely
    from rasterio import features

    geoms, values = [], []
    mask = label != 255
    for geom, value in features.shapes(label, mask=mask, transform=transform, connectivity=4):
        poly = shapely.geometry.shape(geom).simplify(gsd / 2, preserve_topology=True)
        if rng.random() < keep and not poly.is_empty and poly.area > 0:
            geoms.append(shapely.to_wkb(poly))
            values.append(int(value) + 1)  # class_id 1..K: 0 is never a class
    return geoms, values


def write_polygons(path: Path, geoms: list, values: list) -> None:
    import pyogrio

    from segclip_d2.utils.atomic import atomic_output

    with atomic_output(path) as tmp:
        pyogrio.raw.write(
            str(tmp),
            np.array(geoms, dtype=object),
            [np.asarray(values, np.int32)],
            [FIELD],
            layer="labels",
            driver="GPKG",
            geometry_type="Polygon",
            crs=CRS,
        )


def classes_yaml(classes, colors) -> str:
    import yaml

    data = {
        "bands": list(BANDS),
        "field": FIELD,
        "classes": [
            {"name": n, "color": list(c), "prompts": PROMPTS.get(n, [n]), "value": i + 1}
            for i, (n, c) in enumerate(zip(classes, colors))
        ],
    }
    return yaml.safe_dump(data, sort_keys=False)


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    from segclip_d2.data.synthetic import FACTS, generate_tile, tile_scene
    from segclip_d2.utils.atomic import atomic_output

    if args.scenes < 1 or args.size < 64:
        raise UserError("--scenes/--size", "need at least 1 scene of at least 64 px")
    if not 0 <= args.unlabelled < 1:
        raise UserError("--unlabelled", f"must be in 0..1, got {args.unlabelled}")
    if not 0.01 <= args.gsd <= 1000:
        raise UserError("--gsd", f"must be 0.01..1000 m/px, got {args.gsd}")
    dst = Path(args.dst)
    outputs = [dst / "scenes", dst / "labels.gpkg", dst / "classes.yaml"]
    taken = [str(p) for p in outputs if p.exists()]
    if taken:
        raise UserError(taken[0], "already exists", "choose another --dst (nothing overwritten)")
    (dst / "scenes").mkdir(parents=True)
    t0 = time.perf_counter()
    seeds = np.random.SeedSequence(args.seed).spawn(args.scenes + 1)
    rng = np.random.default_rng(seeds.pop())
    geoms, values = [], []
    for i, seed in enumerate(seeds):
        image, label = generate_tile(seed, args.size, tile_scene(i), nodata_prob=0.0, nir=True)
        transform = scene_transform(i, args.size, args.gsd)
        write_scene(dst / "scenes" / f"scene_{i}.tif", image, transform, args.dtype)
        g, v = label_polygons(label, transform, args.gsd, 1.0 - args.unlabelled, rng)
        geoms += g
        values += v
        print(f"scene_{i}.tif: {args.size}x{args.size} px, {len(g)} polygons", flush=True)
    write_polygons(dst / "labels.gpkg", geoms, values)
    with atomic_output(dst / "classes.yaml") as tmp:
        Path(tmp).write_text(classes_yaml(FACTS.classes, FACTS.colors))
    print(
        f"wrote {args.scenes} scenes ({args.dtype}, {', '.join(BANDS)}; {args.gsd} m/px, {CRS}), "
        f"{len(geoms)} polygons in {dst / 'labels.gpkg'} and {dst / 'classes.yaml'} in "
        f"{time.perf_counter() - t0:.0f} s. Next:\n  python datasets/prepare_custom.py --images "
        f"{dst / 'scenes'} --labels {dst / 'labels.gpkg'} --classes {dst / 'classes.yaml'} "
        '--name NAME --dst "$DETECTRON2_DATASETS"'
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
