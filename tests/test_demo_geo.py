"""demo/demo.py with every remote-sensing output on a GeoTIFF built from a real LoveDA tile:
class COG + probabilities + confidence + GeoPackage on the input's grid, VRT input, the run
manifest, several processes (torchrun) and resuming a killed run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from affine import Affine
from test_demo import SHARED_DATA, load_demo, write_config

REPO = Path(__file__).resolve().parents[1]
TILE = SHARED_DATA / "loveda" / "images" / "0.png"
TF = Affine(0.3, 0, 500000, 0, -0.3, 3400000)
FAST = ["--no-progress", "--allow-random-weights", "--block-size", "160", "--block-margin", "16"]


def real_geotiff(path: Path, size=288, y0=300, x0=200):
    import rasterio

    if not TILE.is_file():
        pytest.skip(f"real LoveDA tile not found at {TILE}")
    rgb = cv2.imread(str(TILE))[y0 : y0 + size, x0 : x0 + size, ::-1]
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=size,
        width=size,
        count=3,
        dtype="uint8",
        crs="EPSG:32650",
        transform=TF,
    ) as ds:
        ds.write(rgb.transpose(2, 0, 1))
    return path


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("geo")
    tif = real_geotiff(tmp / "scene.tif")
    out = tmp / "out"
    args = ["--config-file", str(write_config(tmp)), "--input", str(tif), "--output", str(out)]
    args += ["--probabilities", "--confidence", "--vector", "gpkg", *FAST]
    code = load_demo().main(args)
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


def test_manifest_and_skip_existing(full_run, tmp_path):
    out = full_run["out"]
    man = json.loads((out / "run_manifest.json").read_text())
    (rec,) = man["inputs"]
    assert rec["status"] == "done" and rec["seconds"] > 0
    assert "scene_pred.gpkg" in rec["outputs"] and man["classes"]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    config = str(write_config(tmp_path))
    args = ["--config-file", config, "--input", str(full_run["tif"]), "--output", str(out)]
    args += ["--probabilities", "--confidence", "--vector", "gpkg", "--skip-existing", *FAST]
    assert load_demo().main(args) == 0
    man = json.loads((out / "run_manifest.json").read_text())
    assert man["inputs"][0]["status"] == "skipped"
    assert before["scene_probs.tif"] == (out / "scene_probs.tif").stat().st_mtime_ns


def test_vrt_mosaic_input(tmp_path):
    import rasterio
    from rasterio.shutil import copy as rio_copy

    tif = real_geotiff(tmp_path / "part.tif", size=64)
    rio_copy(str(tif), str(tmp_path / "mosaic.vrt"), driver="VRT")
    out = tmp_path / "out"
    args = ["--config-file", str(write_config(tmp_path)), "--input", str(tmp_path / "mosaic.vrt")]
    assert load_demo().main([*args, "--output", str(out), "--no-cog", *FAST]) == 0
    with rasterio.open(out / "mosaic_pred.tif") as ds:
        assert ds.transform == TF and ds.shape == (64, 64)


def saved_weights(config, path):
    """A checkpoint of the randomly initialised tiny model (so processes share weights)."""
    import torch

    demo = load_demo()
    args = demo.get_parser().parse_args(
        ["--config-file", str(config), "--input", "x"] + ["--output", "y"]
    )
    model, _ = demo.build_predictor(demo.setup_cfg(args))
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


@pytest.mark.slow
def test_two_processes_equal_one_and_a_killed_run_resumes(tmp_path):
    import torch

    tiles = [real_geotiff(tmp_path / f"t{i}.tif", size=64, y0=64 * i) for i in range(4)]
    config = write_config(tmp_path)
    # Every process loads the same weights.
    config = weights_config(config, saved_weights(config, tmp_path / "w.pth"))
    one = tmp_path / "one"
    # Every run uses the threads per process of each of the two ranks (cores / 2 = 1 here): float
    # sums in other thread counts may round the last uint8 probability step, or a near-tie
    # between two classes, differently.
    rank_threads = max(1, (os.cpu_count() or 2) // 2)

    def in_process(*args):
        threads = torch.get_num_threads()
        torch.set_num_threads(rank_threads)
        try:
            return load_demo().main(_demo_cmd(config, tiles, *args)[1:])
        finally:
            torch.set_num_threads(threads)

    assert in_process(one, "--probabilities") == 0
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-port", str(29600 + os.getpid() % 300)]
    subprocess.run(
        cmd + _demo_cmd(config, tiles, two, "--probabilities"), env=_env(), check=True, timeout=600
    )
    for t in tiles:
        for suffix in ("_pred.tif", "_probs.tif", "_color.png"):
            name = t.stem + suffix
            assert (one / name).read_bytes() == (two / name).read_bytes(), name
    man = json.loads((two / "run_manifest.json").read_text())
    assert man["world_size"] == 2 and [r["status"] for r in man["inputs"]] == ["done"] * 4
    assert [r["input"] for r in man["inputs"]] == [str(t) for t in tiles]

    # Kill a run after its first input is finished; the rerun does only the rest.
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, *_demo_cmd(config, tiles, killed)],
        env=dict(_env(), OMP_NUM_THREADS=str(rank_threads)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (killed / "t0_overlay.png").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert not (killed / "t3_pred.tif").exists()
    assert not [p for p in killed.iterdir() if p.name.startswith(".")]  # no half-written files
    assert in_process(killed, "--skip-existing") == 0
    status = [r["status"] for r in json.loads((killed / "run_manifest.json").read_text())["inputs"]]
    assert status[0] == "skipped" and status[-1] == "done"
    for t in tiles:
        assert (killed / f"{t.stem}_pred.tif").read_bytes() == (
            one / f"{t.stem}_pred.tif"
        ).read_bytes()
