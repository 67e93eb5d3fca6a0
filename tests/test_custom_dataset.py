"""Your own data: datasets/prepare_custom.py on small GeoTIFF scenes made here (raster and vector
labels, reprojected mosaics, the split, bad input) and the custom config end to end."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from segclip_d2.checkpoint.files import read_checkpoint

rasterio = pytest.importorskip("rasterio")
pyogrio = pytest.importorskip("pyogrio")
shapely = pytest.importorskip("shapely")

from rasterio.transform import from_origin  # noqa: E402
from rasterio.warp import Resampling, calculate_default_transform, reproject  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CRS = "EPSG:32633"
SIZE = 96  # scene side, px
GSD = 1.0
BANDS = ["red", "green", "blue", "nir"]
# class value in the label files -> (name, colour)
CLASSES = {1: ("building", [230, 25, 75]), 2: ("tree", [60, 180, 75]), 3: ("water", [0, 130, 200])}
# rectangles (value, x0, y0, x1, y1) in pixels of each scene; the rest is unlabelled
RECTS = [(1, 8, 8, 40, 30), (2, 50, 10, 90, 60), (3, 10, 50, 45, 90), (2, 60, 70, 80, 88)]


def _load_prepare():
    spec = importlib.util.spec_from_file_location(
        "prepare_custom", REPO / "datasets/prepare_custom.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


prepare_custom = _load_prepare()


def scene_origin(i: int) -> tuple[float, float]:
    """Scenes side by side, 10 px apart (west, north)."""
    return 500000.0 + i * (SIZE + 10) * GSD, 5000000.0


def truth(i: int) -> np.ndarray:
    """The label values (0 = unlabelled) of scene ``i``; shifted per scene so scenes differ."""
    lab = np.zeros((SIZE, SIZE), np.uint8)
    for v, x0, y0, x1, y1 in RECTS:
        lab[y0 + i : y1 + i, x0:x1] = v
    return lab


def write_scene(path: Path, i: int, dtype="uint16", crs=CRS, gsd=GSD) -> Path:
    rng = np.random.default_rng(i)
    lab = truth(i)
    data = rng.integers(100, 2000, (4, SIZE, SIZE)).astype(dtype)
    data[3] += (lab == 2).astype(dtype) * 3000  # NIR bright on trees
    west, north = scene_origin(i)
    profile = dict(driver="GTiff", width=SIZE, height=SIZE, count=4, dtype=dtype, crs=crs)
    with rasterio.open(path, "w", **profile, transform=from_origin(west, north, gsd, gsd)) as dst:
        dst.write(data)
    return path


def write_label_raster(path: Path, i: int, value_offset: int = 0) -> Path:
    west, north = scene_origin(i)
    lab = truth(i) + np.where(truth(i) > 0, value_offset, 0).astype(np.uint8)
    profile = dict(
        driver="GTiff", width=SIZE, height=SIZE, count=1, dtype="uint8", crs=CRS, nodata=0
    )
    with rasterio.open(path, "w", **profile, transform=from_origin(west, north, GSD, GSD)) as dst:
        dst.write(lab[None])
    return path


def write_polygons(path: Path, n_scenes: int, extra=()) -> Path:
    """The RECTS of every scene as polygons with attribute ``kind``; ``extra``: more
    (value, geometry) features."""
    geoms, values = [], []
    for i in range(n_scenes):
        west, north = scene_origin(i)
        for v, x0, y0, x1, y1 in RECTS:
            geoms.append(
                shapely.box(
                    west + x0 * GSD, north - (y1 + i) * GSD, west + x1 * GSD, north - (y0 + i) * GSD
                )
            )
            values.append(v)
    for v, g in extra:
        geoms.append(g)
        values.append(v)
    pyogrio.raw.write(
        str(path),
        np.array([shapely.to_wkb(g) for g in geoms], dtype=object),
        [np.array(values, dtype=np.int32)],
        ["kind"],
        geometry_type="Polygon",
        crs=CRS,
        driver="GPKG",
    )
    return path


def write_classes(path: Path, **extra) -> Path:
    data = {
        "bands": BANDS,
        "field": "kind",
        "ignore_value": 0,
        "classes": [
            {
                "name": n,
                "color": c,
                "prompts": [f"a photo with a {n}", f"{n} from above"],
                "value": v,
            }
            for v, (n, c) in CLASSES.items()
        ],
        **extra,
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def scenes(tmp_path) -> Path:
    folder = tmp_path / "scenes"
    folder.mkdir()
    for i in range(3):
        write_scene(folder / f"scene{i}.tif", i)
    return folder


def run(tmp_path, scenes, labels, name="mine", extra=(), classes=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    classes = classes or write_classes(tmp_path / "classes.yaml")
    argv = ["--images", str(scenes), "--labels", *map(str, labels), "--classes", str(classes)]
    argv += ["--name", name, "--dst", str(tmp_path / "root"), "--tile-size", "64", *extra]
    return prepare_custom.main(argv)


def read_labels(root: Path) -> dict[str, np.ndarray]:
    import cv2

    return {
        p.stem: cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        for p in sorted(root.glob("*/labels/*.png"))
    }


def expected_train_ids(stem: str) -> np.ndarray:
    """Train ids of tile ``stem`` (scene<i>_<y>_<x>) from the truth."""
    scene, y, x = stem.rsplit("_", 2)
    lab = np.zeros((SIZE + 64, SIZE + 64), np.uint8)  # past the scene: unlabelled
    lab[:SIZE, :SIZE] = truth(int(scene[-1]))
    lab = lab[int(y) : int(y) + 64, int(x) : int(x) + 64]
    lut = np.full(256, 255, np.uint8)
    for tid, v in enumerate(CLASSES):
        lut[v] = tid
    return lut[lab]


def test_sample_scenes_prepare_into_the_generators_labels(tmp_path):
    """datasets/make_sample_scenes.py (4-band uint16 scenes + a GeoPackage, the own-data
    walkthrough's input) through prepare_custom: the tiles hold the scenes' bands and the
    rasterised polygons give the generator's labels back (outlines simplified by half a pixel:
    a few boundary pixels may move)."""
    import cv2

    from segclip_d2.data.synthetic import generate_tile, tile_scene

    spec = importlib.util.spec_from_file_location(
        "make_sample_scenes", REPO / "datasets/make_sample_scenes.py"
    )
    samples = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(samples)
    src = tmp_path / "samples"
    argv = ["--dst", str(src), "--scenes", "2", "--size", "128", "--unlabelled", "0"]
    assert samples.main(argv) == 0
    assert samples.run_main(samples.main, argv) == 2  # nothing overwritten
    argv = ["--images", str(src / "scenes"), "--labels", str(src / "labels.gpkg"), "--classes",
            str(src / "classes.yaml"), "--name", "smp", "--dst", str(tmp_path / "root"),
            "--tile-size", "64"]  # fmt: skip
    assert prepare_custom.main(argv) == 0
    seeds = np.random.SeedSequence(0).spawn(3)
    truth = [generate_tile(seeds[i], 128, tile_scene(i), nodata_prob=0.0, nir=True) for i in (0, 1)]
    tiles = sorted((tmp_path / "root/smp").glob("*/labels/*.png"))
    assert len(tiles) == 8
    agree = []
    for lab_path in tiles:
        scene, y, x = lab_path.stem.rsplit("_", 2)
        image, label = truth[int(scene[-1])]
        y, x = int(y), int(x)
        got = cv2.imread(str(lab_path), cv2.IMREAD_UNCHANGED)
        agree.append((got == label[y : y + 64, x : x + 64]).mean())
        with rasterio.open(lab_path.parents[1] / "images" / f"{lab_path.stem}.tif") as ds:
            assert ds.descriptions == ("red", "green", "blue", "nir") and ds.dtypes[0] == "uint16"
            bands = ds.read().transpose(1, 2, 0)
        want = image[y : y + 64, x : x + 64].astype(np.uint16) * samples.UINT16_GAIN
        np.testing.assert_array_equal(bands, want + samples.UINT16_OFFSET)
    assert min(agree) > 0.95 and np.mean(agree) > 0.99, agree


# --------------------------------------------------------------------------- label paths
def test_vector_and_raster_labels_agree(tmp_path, scenes):
    gpkg = write_polygons(tmp_path / "labels.gpkg", 3)
    assert run(tmp_path / "v", scenes, [gpkg]) == 0
    lab_dir = tmp_path / "labels"
    lab_dir.mkdir()
    for i in range(3):
        write_label_raster(lab_dir / f"scene{i}.tif", i)
    assert run(tmp_path / "r", scenes, [lab_dir]) == 0
    vec = read_labels(tmp_path / "v/root/mine")
    ras = read_labels(tmp_path / "r/root/mine")
    assert vec.keys() == ras.keys() and len(vec) >= 6
    for stem in vec:
        np.testing.assert_array_equal(vec[stem], ras[stem], err_msg=stem)
        np.testing.assert_array_equal(vec[stem], expected_train_ids(stem), err_msg=stem)
    # unlabelled pixels are ignore, never class 0
    assert all((255 in a) and a.shape == (64, 64) for a in vec.values())


def test_reprojected_mosaic_lands_on_the_right_pixels(tmp_path, scenes):
    """One label mosaic in Web Mercator at a finer pixel size, covering the three scenes."""
    width = 3 * SIZE + 20
    west, north = scene_origin(0)
    mosaic = np.zeros((SIZE + 4, width), np.uint8)
    for i in range(3):
        x0 = i * (SIZE + 10)
        mosaic[:SIZE, x0 : x0 + SIZE] = truth(i)
    src_t = from_origin(west, north, GSD, GSD)
    dst_crs = "EPSG:3857"
    t, w, h = calculate_default_transform(
        CRS, dst_crs, width, SIZE + 4, west, north - (SIZE + 4), west + width, north, resolution=0.4
    )
    warped = np.zeros((h, w), np.uint8)
    reproject(
        mosaic,
        warped,
        src_transform=src_t,
        src_crs=CRS,
        dst_transform=t,
        dst_crs=dst_crs,
        resampling=Resampling.nearest,
        src_nodata=0,
        dst_nodata=0,
    )
    path = tmp_path / "mosaic.tif"
    profile = dict(driver="GTiff", width=w, height=h, count=1, dtype="uint8", crs=dst_crs, nodata=0)
    with rasterio.open(path, "w", **profile, transform=t) as dst:
        dst.write(warped[None])
    assert run(tmp_path, scenes, [path]) == 0
    import cv2

    for stem, got in read_labels(tmp_path / "root/mine").items():
        want = expected_train_ids(stem)
        # pixels not on a class edge (1 px) must match exactly
        edges = np.zeros_like(want)
        for v in np.unique(want):
            m = (want == v).astype(np.uint8)
            edges |= (
                cv2.dilate(m, np.ones((3, 3), np.uint8)) != cv2.erode(m, np.ones((3, 3), np.uint8))
            ).astype(np.uint8)
        inner = edges == 0
        assert inner.sum() > 0.5 * want.size
        np.testing.assert_array_equal(got[inner], want[inner], err_msg=stem)


# --------------------------------------------------------------------------- split
def _scene_of(stem: str) -> str:
    return stem.rsplit("_", 2)[0]


def test_scene_split_keeps_every_scene_on_one_side(tmp_path, scenes):
    gpkg = write_polygons(tmp_path / "labels.gpkg", 3)
    assert run(tmp_path, scenes, [gpkg], extra=["--val-fraction", "0.34"]) == 0
    root = tmp_path / "root/mine"
    sides = {
        s: {_scene_of(p.stem) for p in (root / s / "images").glob("*.tif")}
        for s in ("train", "val")
    }
    assert sides["train"] and sides["val"] and not sides["train"] & sides["val"]
    record = yaml.safe_load((root / "dataset.yaml").read_text())
    assert (
        record["split"]["method"] == "scene" and set(record["split"]["val_scenes"]) == sides["val"]
    )
    assert record["tiles"] == {s: len(list((root / s / "labels").glob("*.png"))) for s in sides}


def test_block_split_of_one_scene_keeps_blocks_whole(tmp_path):
    folder = tmp_path / "scenes"
    folder.mkdir()
    write_scene(folder / "scene0.tif", 0)
    gpkg = write_polygons(tmp_path / "labels.gpkg", 1)
    extra = ["--tile-size", "32", "--block-tiles", "2", "--val-fraction", "0.25"]
    assert run(tmp_path, folder, [gpkg], extra=extra) == 0
    root = tmp_path / "root/mine"
    record = yaml.safe_load((root / "dataset.yaml").read_text())
    assert record["split"]["method"] == "block" and record["split"]["block_size_px"] == 64
    blocks = {}
    for split in ("train", "val"):
        for p in (root / split / "images").glob("*.tif"):
            _, y, x = p.stem.rsplit("_", 2)
            blocks.setdefault((int(y) // 64, int(x) // 64), set()).add(split)
    assert all(len(sides) == 1 for sides in blocks.values()), blocks
    assert {"train", "val"} == set().union(*blocks.values())


def test_tiles_keep_bands_georeference_and_statistics(tmp_path, scenes):
    gpkg = write_polygons(tmp_path / "labels.gpkg", 3)
    assert run(tmp_path, scenes, [gpkg]) == 0
    root = tmp_path / "root/mine"
    record = yaml.safe_load((root / "dataset.yaml").read_text())
    tile = root / "train/images/scene0_000000_000064.tif"
    with rasterio.open(tile) as src, rasterio.open(scenes / "scene0.tif") as full:
        assert src.count == 4 and src.dtypes[0] == "uint16" and src.crs == full.crs
        assert src.transform.c == full.transform.c + 64 and src.descriptions == tuple(BANDS)
        np.testing.assert_array_equal(src.read()[:, :, :32], full.read(window=((0, 64), (64, 96))))
        assert src.shape == (64, 64) and not src.read()[:, :, 32:].any()  # padded past the edge
    data = []
    for p in sorted((root / "train/images").glob("*.tif")):
        _, y, x = (int(v) if v.isdigit() else v for v in p.stem.rsplit("_", 2))
        data.append(rasterio.open(p).read()[:, : SIZE - y, : SIZE - x].reshape(4, -1))
    flat = np.concatenate(data, axis=1).astype(np.float64)
    np.testing.assert_allclose(record["pixel_mean"], flat.mean(1), rtol=1e-5)
    np.testing.assert_allclose(record["pixel_std"], flat.std(1), rtol=1e-4)
    assert record["gsd_m"] == 1.0 and record["bands"] == BANDS
    assert [c["name"] for c in record["classes"]] == ["building", "tree", "water"]


# --------------------------------------------------------------------------- bad input
def _bad_scene_crs(tmp_path, scenes):
    write_scene(scenes / "scene1.tif", 1, crs="EPSG:32634")
    return [write_polygons(tmp_path / "labels.gpkg", 3)]


def _bad_scene_gsd(tmp_path, scenes):
    write_scene(scenes / "scene1.tif", 1, gsd=0.5)
    return [write_polygons(tmp_path / "labels.gpkg", 3)]


def _unknown_vector_value(tmp_path, scenes):
    west, north = scene_origin(0)
    extra = [(9, shapely.box(west + 1, north - 5, west + 5, north - 1))]
    return [write_polygons(tmp_path / "labels.gpkg", 3, extra)]


def _polygon_outside(tmp_path, scenes):
    extra = [(1, shapely.box(0, 0, 10, 10))]
    return [write_polygons(tmp_path / "labels.gpkg", 3, extra)]


def _unknown_raster_value(tmp_path, scenes):
    folder = tmp_path / "labels"
    folder.mkdir()
    for i in range(3):
        write_label_raster(folder / f"scene{i}.tif", i, value_offset=4 if i == 2 else 0)
    return [folder]


def _raster_off_scene(tmp_path, scenes):
    folder = tmp_path / "labels"
    folder.mkdir()
    for i in range(3):
        write_label_raster(folder / f"scene{i}.tif", i if i != 1 else 40)
    return [folder]


BAD_CASES = {
    "scenes in different CRSs": (_bad_scene_crs, "is in EPSG:32634"),
    "scenes at different GSDs": (_bad_scene_gsd, "has pixel size"),
    "vector value not in classes.yaml": (_unknown_vector_value, "label values not in"),
    "polygons outside every scene": (_polygon_outside, "outside every scene"),
    "raster value not in classes.yaml": (_unknown_raster_value, "label values not in"),
    "label raster off its scene": (_raster_off_scene, "does not overlap its scene"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, scenes, capsys, case):
    make, message = BAD_CASES[case]
    labels = make(tmp_path, scenes)
    # an earlier dataset of the same name survives a failed --overwrite run untouched
    good = (
        write_polygons(tmp_path / "good.gpkg", 3) if "labels.gpkg" not in str(labels[0]) else None
    )
    previous = None
    if good is not None:
        assert run(tmp_path, scenes, [good]) == 0
        previous = (tmp_path / "root/mine/dataset.yaml").read_bytes()
    capsys.readouterr()
    assert run(tmp_path, scenes, labels, extra=["--overwrite"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err
    root = tmp_path / "root"
    leftovers = [p.name for p in root.iterdir()] if root.exists() else []
    if previous is None:
        assert leftovers == [], leftovers
    else:
        assert leftovers == ["mine"] and (root / "mine/dataset.yaml").read_bytes() == previous


def test_unsafe_yaml_and_unknown_keys_are_refused(tmp_path, scenes, capsys):
    gpkg = write_polygons(tmp_path / "labels.gpkg", 3)
    bad = tmp_path / "unsafe.yaml"
    bad.write_text("classes: !!python/object/apply:os.system ['echo hi']\n")
    assert run(tmp_path, scenes, [gpkg], classes=bad) == 2
    assert "not valid YAML" in capsys.readouterr().err
    typo = write_classes(tmp_path / "typo.yaml", colour=1)
    assert run(tmp_path, scenes, [gpkg], classes=typo) == 2
    assert "unknown keys ['colour']" in capsys.readouterr().err
    assert not (tmp_path / "root").exists()


def test_prepare_help_names_the_split(capsys):
    with pytest.raises(SystemExit):
        prepare_custom.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "by SCENE" in out and "spatial BLOCK" in out and "never by tile" in out


# --------------------------------------------------------------------------- registration + train
def test_registered_metadata_and_config_from_the_name(tmp_path, scenes, monkeypatch):
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from segclip_d2 import add_segclip_config
    from segclip_d2.config import load_config
    from segclip_d2.data.custom import apply_custom_dataset

    gpkg = write_polygons(tmp_path / "labels.gpkg", 3)
    assert run(tmp_path, scenes, [gpkg], name="regtest") == 0
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "root"))
    cfg = get_cfg()
    add_segclip_config(cfg)
    load_config(str(REPO / "configs/custom/segclip_cpu.yaml"), ["DATASETS.CUSTOM", "regtest"], cfg)
    apply_custom_dataset(cfg)
    record = yaml.safe_load((tmp_path / "root/regtest/dataset.yaml").read_text())
    assert cfg.DATASETS.TRAIN == ("regtest_train",) and cfg.DATASETS.TEST == ("regtest_val",)
    assert list(cfg.INPUT.BANDS) == BANDS and list(cfg.MODEL.PIXEL_MEAN) == record["pixel_mean"]
    assert list(cfg.MODEL.PIXEL_STD) == record["pixel_std"] and cfg.INPUT.GSD_M == 1.0
    meta = MetadataCatalog.get("regtest_val")
    assert meta.stuff_classes == ["building", "tree", "water"] and meta.evaluator_type == "sem_seg"
    assert meta.stuff_colors == [c for _, c in CLASSES.values()] and meta.ignore_label == 255
    assert meta.prompts[1] == ["a photo with a tree", "tree from above"] and meta.bands == BANDS
    assert meta.pixel_mean == record["pixel_mean"] and meta.gsd_m == 1.0
    assert len(DatasetCatalog.get("regtest_val")) == record["tiles"]["val"]


@pytest.mark.slow
def test_four_band_model_trains_and_evaluates(tmp_path, scenes):
    """prepare_custom.py then train_net.py with the custom CPU config and only the name."""
    gpkg = write_polygons(tmp_path / "labels.gpkg", 3)
    assert run(tmp_path, scenes, [gpkg], name="e2e") == 0
    out = tmp_path / "run"
    tiny = [
        "MODEL.SEGCLIP.NUM_QUERIES", "8", "MODEL.SEGCLIP.HIDDEN_DIM", "32",
        "MODEL.SEGCLIP.DIM_FEEDFORWARD", "64", "MODEL.SEGCLIP.DEC_LAYERS", "2",
        "MODEL.SEGCLIP.MASK_DIM", "32", "MODEL.SEGCLIP.PIXEL_DECODER.CONVS_DIM", "32",
        "MODEL.SEGCLIP.PIXEL_DECODER.ENC_LAYERS", "1", "MODEL.SEGCLIP.LOSS.TRAIN_NUM_POINTS", "256",
        "INPUT.CROP.SIZE", "(64, 64)", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "3",
        "SOLVER.CHECKPOINT_PERIOD", "1000", "TEST.EVAL_PERIOD", "0", "DATALOADER.NUM_WORKERS", "0",
    ]  # fmt: skip
    cmd = [sys.executable, str(REPO / "train_net.py"), "--config-file",
           str(REPO / "configs/custom/segclip_cpu.yaml"), "DATASETS.CUSTOM", "e2e",
           "OUTPUT_DIR", str(out), *tiny]  # fmt: skip
    env = {**os.environ, "DETECTRON2_DATASETS": str(tmp_path / "root"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "e2e_val: mIoU" in proc.stdout + proc.stderr

    ckpt = read_checkpoint(out / "model_final.pth")
    assert ckpt["model"]["backbone.stem.conv1.weight"].shape[1] == 4
    card = ckpt["model_card"]
    assert card["class_names"] == ["building", "tree", "water"]
    assert len(card["input"]["pixel_mean"]) == 4
    assert (out / "predictions").is_dir()


@pytest.mark.slow
def test_own_data_benchmark_script_runs_every_step(tmp_path):
    """tools/benchmark_own_data.sh (the timed walkthrough) on 2 scenes of one ONNX tile (512 px),
    2 iterations:
    every step runs, and the demo and its ONNX run agree on the 4-band scene."""
    work = tmp_path / "w"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(REPO / "tools/benchmark_own_data.sh"), str(work), "2", "512", "2"],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr + (work / "steps.log").read_text()
    import re

    steps = [m[1] for m in re.finditer(r"^(\w+) +[\d.]+ s$", proc.stdout, re.M)]
    assert steps == ["samples", "prepare", "train", "evaluate", "demo", "export", "onnx_demo"]
    assert "input (B, 4, 512, 512)" in proc.stdout and "resolution: 30.0 cm/px" in proc.stdout
    [agree] = re.findall(r"^demo vs demo --onnx.*: ([\d.]+)% of pixels agree$", proc.stdout, re.M)
    assert float(agree) >= 99
    # a second run into the same folder is refused, nothing touched
    again = subprocess.run(["bash", str(REPO / "tools/benchmark_own_data.sh"), str(work)],
                           capture_output=True, text=True, env=env)  # fmt: skip
    assert again.returncode == 2 and "already exists" in again.stderr
