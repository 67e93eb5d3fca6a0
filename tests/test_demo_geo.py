"""demo/demo.py with every remote-sensing output on a GeoTIFF built from a real LoveDA tile:
class COG + probabilities + confidence + GeoPackage on the input's grid, VRT input, the run
manifest, several processes (torchrun) and resuming a killed run."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from affine import Affine

REPO = Path(__file__).resolve().parents[1]
TF = Affine(0.3, 0, 500000, 0, -0.3, 3400000)
FAST = ["--no-progress", "--allow-random-weights", "--block-size", "160", "--block-margin", "16"]


@pytest.fixture(scope="session")
def tile(shared_data) -> Path:
    path = shared_data / "loveda" / "images" / "0.png"
    if not path.is_file():
        pytest.skip(f"real LoveDA tile not found at {path}")
    return path


def real_geotiff(tile: Path, path: Path, size=288, y0=300, x0=200):
    import rasterio

    rgb = cv2.imread(str(tile))[y0 : y0 + size, x0 : x0 + size, ::-1]
    profile = dict(driver="GTiff", height=size, width=size, count=3, dtype="uint8")
    with rasterio.open(path, "w", crs="EPSG:32650", transform=TF, **profile) as ds:
        ds.write(rgb.transpose(2, 0, 1))
    return path


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tile, demo, tiny_config):
    tmp = tmp_path_factory.mktemp("geo")
    tif = real_geotiff(tile, tmp / "scene.tif")
    out = tmp / "out"
    args = ["--config-file", str(tiny_config(tmp)), "--input", str(tif), "--output", str(out)]
    args += ["--probabilities", "--confidence", "--vector", "gpkg", *FAST]
    code = demo.main(args)
    return {"code": code, "out": out, "tif": tif}


def test_one_command_writes_cog_probabilities_confidence_and_polygons_on_the_input_grid(full_run):
    import rasterio

    from segclip_d2.data.dataset_facts import get_facts

    names = list(get_facts("synthetic_aerial").classes)
    out = full_run["out"]
    assert full_run["code"] == 0
    with rasterio.open(full_run["tif"]) as src:
        grid = (src.crs, src.transform, src.shape)
    for name, count in [("scene_pred", 1), ("scene_probs", len(names)), ("scene_confidence", 2)]:
        with rasterio.open(out / f"{name}.tif") as ds:
            assert (ds.crs, ds.transform, ds.shape) == grid, name
            assert ds.count == count
            assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG", name
            assert ds.block_shapes[0] == (256, 256) and ds.overviews(1), name
    with rasterio.open(out / "scene_pred.tif") as ds:
        ids = ds.read(1)
        ov = ds.read(1, out_shape=(ds.height // 2, ds.width // 2))  # the overview level
        assert ds.colormap(1)[255][3] == 0
    assert set(np.unique(ov)) <= set(np.unique(ids))  # nearest overviews: real class ids
    with rasterio.open(out / "scene_probs.tif") as ds:
        assert list(ds.descriptions) == names
        probs = ds.read().astype(np.int32)
    with rasterio.open(out / "scene_confidence.tif") as ds:
        conf = ds.read().astype(np.int32)
    assert np.abs(probs.sum(0) - 255).max() <= len(names)  # uint8-scaled, sums to 1
    top = np.sort(probs, axis=0)
    assert np.abs(conf[0] - top[-1]).max() <= 1 and np.abs(conf[1] - (top[-1] - top[-2])).max() <= 2
    assert (probs.argmax(0) == ids).mean() > 0.99
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_polygons_rasterise_back_to_the_class_map(full_run):
    import pyogrio
    from rasterio.features import rasterize
    from shapely import from_wkb

    out = full_run["out"]
    meta, _, geoms, fields = pyogrio.raw.read(out / "scene_pred.gpkg")
    cols = dict(zip(meta["fields"], fields))
    import rasterio

    with rasterio.open(out / "scene_pred.tif") as ds:
        ids, crs = ds.read(1), ds.crs
    assert pyogrio.read_info(out / "scene_pred.gpkg")["crs"] and crs.to_epsg() == 32650
    back = rasterize(
        zip(from_wkb(geoms), cols["class_id"]), out_shape=ids.shape, transform=TF, fill=255
    )
    assert (back == ids).mean() >= 0.995
    assert np.all((cols["mean_confidence"] > 0) & (cols["mean_confidence"] <= 1))
    np.testing.assert_allclose(cols["area_m2"].sum(), ids.size * 0.09, rtol=1e-6)


def test_manifest_and_skip_existing(full_run, demo, tiny_config, tmp_path):
    out = full_run["out"]
    man = json.loads((out / "run_manifest.json").read_text())
    (rec,) = man["inputs"]
    assert rec["status"] == "done" and rec["seconds"] > 0
    assert "scene_pred.gpkg" in rec["outputs"] and man["classes"]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    config = str(tiny_config(tmp_path))
    args = ["--config-file", config, "--input", str(full_run["tif"]), "--output", str(out)]
    args += ["--probabilities", "--confidence", "--vector", "gpkg", "--skip-existing", *FAST]
    assert demo.main(args) == 0
    man = json.loads((out / "run_manifest.json").read_text())
    assert man["inputs"][0]["status"] == "skipped"
    assert before["scene_probs.tif"] == (out / "scene_probs.tif").stat().st_mtime_ns


def test_vrt_mosaic_input(tmp_path, tile, demo, tiny_config):
    import rasterio
    from rasterio.shutil import copy as rio_copy

    tif = real_geotiff(tile, tmp_path / "part.tif", size=64)
    rio_copy(str(tif), str(tmp_path / "mosaic.vrt"), driver="VRT")
    out = tmp_path / "out"
    args = ["--config-file", str(tiny_config(tmp_path)), "--input", str(tmp_path / "mosaic.vrt")]
    assert demo.main([*args, "--output", str(out), "--no-cog", *FAST]) == 0
    with rasterio.open(out / "mosaic_pred.tif") as ds:
        assert ds.transform == TF and ds.shape == (64, 64)


def saved_weights(demo, config, path):
    """A checkpoint of the randomly initialised tiny model (so processes share weights)."""
    import torch

    from segclip_d2.predict.load import load_model

    _, model = load_model(config, allow_random_weights=True, optimize=False)
    torch.save({"model": model.state_dict()}, path)
    return path


def weights_config(config, weights):
    path = config.with_name("tiny_weights.yaml")
    path.write_text(config.read_text().replace("MODEL:\n", f"MODEL:\n  WEIGHTS: {weights}\n", 1))
    return path


def _demo_cmd(config, inputs, out, *extra):
    return (
        [str(REPO / "demo" / "demo.py"), "--config-file", str(config), "--input"]
        + [str(p) for p in inputs]
        + ["--output", str(out), "--no-cog", *FAST, *extra]
    )


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(k, None)
    return env


def assert_same_prediction(a: Path, b: Path, name: str) -> None:
    """What a user relies on across runs: the same class map (up to rare near-ties whose float
    sums round differently) and probabilities within one uint8 step."""
    import rasterio

    with rasterio.open(a / name) as da, rasterio.open(b / name) as db:
        x, y = da.read().astype(np.int32), db.read().astype(np.int32)
        assert (da.crs, da.transform, da.count) == (db.crs, db.transform, db.count), name
    if x.shape[0] == 1:  # class ids
        assert (x == y).mean() >= 0.999, name
    else:
        assert np.abs(x - y).max() <= 1, name


@pytest.mark.slow
def test_two_processes_equal_one_and_a_killed_run_resumes(tmp_path, tile, demo, tiny_config):
    tiles = [real_geotiff(tile, tmp_path / f"t{i}.tif", size=64, y0=64 * i) for i in range(4)]
    config = tiny_config(tmp_path)
    # Every process loads the same weights.
    config = weights_config(config, saved_weights(demo, config, tmp_path / "w.pth"))
    one = tmp_path / "one"
    assert demo.main(_demo_cmd(config, tiles, one, "--probabilities")[1:]) == 0
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-port", str(29600 + os.getpid() % 300)]
    subprocess.run(
        cmd + _demo_cmd(config, tiles, two, "--probabilities"), env=_env(), check=True, timeout=600
    )
    for t in tiles:
        for suffix in ("_pred.tif", "_probs.tif"):
            assert_same_prediction(one, two, t.stem + suffix)
    man = json.loads((two / "run_manifest.json").read_text())
    assert man["world_size"] == 2 and [r["status"] for r in man["inputs"]] == ["done"] * 4
    assert [r["input"] for r in man["inputs"]] == [str(t) for t in tiles]

    # A run killed (SIGTERM) right after its first input, at a fixed point instead of a race
    # with the clock; the rerun with --skip-existing does only the rest.
    killed = tmp_path / "killed"
    proc = subprocess.run(
        [sys.executable, *_demo_cmd(config, tiles, killed)],
        env=dict(_env(), SEGCLIP_DEMO_STOP_AFTER="1"),
        capture_output=True,
        timeout=600,
    )
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert (killed / "t0_pred.tif").is_file() and not list(killed.glob("t1_*"))
    assert not [p for p in killed.iterdir() if p.name.startswith(".")]  # no half-written files
    first = json.loads((killed / "run_manifest.json").read_text())
    assert not first["complete"] and [r["status"] for r in first["inputs"]] == ["done"]
    assert demo.main(_demo_cmd(config, tiles, killed, "--skip-existing")[1:]) == 0
    man = json.loads((killed / "run_manifest.json").read_text())
    assert man["complete"] and [r["status"] for r in man["inputs"]] == ["skipped"] + ["done"] * 3
    for t in tiles:
        assert_same_prediction(one, killed, f"{t.stem}_pred.tif")
