"""N input bands in prediction and export: a tiny red, green, blue, NIR model (random weights,
saved with its card) predicts a 4-band GeoTIFF whose bands are stored in another order (chosen
by their descriptions), is exported to a 4-channel ONNX file, and the ONNX back-end agrees."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

rasterio = pytest.importorskip("rasterio")
pytest.importorskip("onnxruntime")

from rasterio.enums import ColorInterp  # noqa: E402
from rasterio.transform import from_origin  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TILE = 64
BANDS = ["red", "green", "blue", "nir"]
FILE_ORDER = ["nir", "red", "green", "blue"]  # how the test raster stores them
TINY = {
    "NUM_QUERIES": 10, "HIDDEN_DIM": 32, "NHEADS": 2, "DIM_FEEDFORWARD": 64, "DEC_LAYERS": 2,
    "MASK_DIM": 32, "PIXEL_DECODER.CONVS_DIM": 32, "PIXEL_DECODER.ENC_LAYERS": 1,
    "PIXEL_DECODER.DIM_FEEDFORWARD": 64, "TEXT.PRETRAINED": "",
}  # fmt: skip


def _image() -> np.ndarray:
    """(TILE, TILE, 4) uint8 in the model's band order: blocks of distinct colour and NIR."""
    rng = np.random.default_rng(5)
    img = rng.integers(0, 40, (TILE, TILE, 4)).astype(np.uint8)
    img[:32, :, 1] += 150  # green, NIR bright (vegetation)
    img[:32, :, 3] += 200
    img[32:, 32:, 2] += 120  # blue, NIR dark (water)
    img[32:, :32, :3] += 180  # bright roofs
    return img


def write_raster(path: Path, image: np.ndarray, names: list[str], order: list[str]) -> Path:
    """``image`` (bands in ``names`` order) written in ``order``, each band described by name."""
    data = np.stack([image[..., names.index(n)] for n in order])
    profile = dict(driver="GTiff", width=image.shape[1], height=image.shape[0], count=len(order))
    transform = from_origin(500000.0, 5000000.0, 0.5, 0.5)
    with rasterio.open(
        path, "w", **profile, dtype=image.dtype, crs="EPSG:32633", transform=transform
    ) as ds:
        ds.write(data)
        ds.colorinterp = [ColorInterp.undefined] * len(order)  # no colour tags: names only
        for i, name in enumerate(order, start=1):
            ds.set_band_description(i, name)
    return path


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def nband(tmp_path_factory):
    """The tiny 4-band checkpoint with its card, its config, a 4-band raster (NIR first) and
    the model's own probabilities on the raster's bands in the model's order."""
    from detectron2.modeling import build_model

    import segclip_d2  # noqa: F401  (registers the datasets)
    from segclip_d2.checkpoint.card import build_model_card
    from segclip_d2.checkpoint.checkpointer import ModelCardCheckpointer
    from segclip_d2.config import load_config

    tmp = tmp_path_factory.mktemp("nband")
    opts = [v for k, val in TINY.items() for v in (f"MODEL.SEGCLIP.{k}", str(val))]
    opts += ["INPUT.CROP.SIZE", f"({TILE}, {TILE})", "INPUT.GSD_M", "0.5", "OUTPUT_DIR", str(tmp)]
    opts += ["TEST.MODE", "whole", "TEST.PRECISION", "fp32"]
    cfg = load_config(str(REPO / "configs/synthetic/segclip_nir_cpu.yaml"), opts)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    ckpt = ModelCardCheckpointer(model, str(tmp), card_fn=lambda _: build_model_card(cfg, model))
    ckpt.save("model_final", iteration=2)
    config = tmp / "config.yaml"
    config.write_text(cfg.dump())
    image = _image()
    raster = write_raster(tmp / "scene.tif", image, BANDS, FILE_ORDER)
    with torch.no_grad():
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
        probs = [model.predict_sem_seg_probs(v)[0] for v in (x, x[:, [3, 0, 1, 2]])]
    ref, shuffled = (p / p.sum(0, keepdim=True) for p in probs)
    # the random model sees the band order (so the demo's check below can fail): measured
    # 0.016 mean |dprob| between the model's order and NIR first
    assert (ref - shuffled).abs().mean() > 0.008
    return {"tmp": tmp, "config": config, "weights": tmp / "model_final.pth", "raster": raster,
            "image": image, "ref": ref.numpy()}  # fmt: skip


def _demo(argv):
    demo = _load("segclip_demo_nband", REPO / "demo/demo.py")
    return demo.main(["--no-progress", *argv])


def _pred(path: Path):
    with rasterio.open(path) as ds:
        return ds.read(1), ds.crs, ds.transform, (ds.height, ds.width)


def test_card_records_the_bands_and_what_they_hold(nband):
    from segclip_d2.checkpoint.files import read_checkpoint

    card = read_checkpoint(str(nband["weights"]))["model_card"]
    assert card["input"]["bands"] == BANDS
    assert card["input"]["values"] == "as_read" and "value_range" not in card["input"]
    assert len(card["input"]["pixel_mean"]) == len(card["input"]["pixel_std"]) == 4


def test_source_picks_the_bands_by_name_in_the_models_order(nband):
    from segclip_d2.raster.sources import open_source

    src = open_source(nband["raster"], None, BANDS, "as_read")
    try:
        data, valid = src.read(0, 0, TILE, TILE)
    finally:
        src.close()
    np.testing.assert_array_equal(data, nband["image"])
    assert valid.all()
    # by number: the same bands named 2,3,4,1 in the file
    src = open_source(nband["raster"], (2, 3, 4, 1), BANDS, "as_read")
    try:
        np.testing.assert_array_equal(src.read(0, 0, TILE, TILE)[0], nband["image"])
    finally:
        src.close()


def test_nband_demo_export_and_onnx_demo_agree(nband, caplog):
    from segclip_d2.deploy.onnx_predictor import OnnxSegmenter

    out_pt, out_onnx = nband["tmp"] / "out_pt", nband["tmp"] / "out_onnx"
    common = ["--input", str(nband["raster"]), "--block-size", str(TILE)]
    code = _demo(["--config-file", str(nband["config"]), "--output", str(out_pt), *common,
                  "--probabilities", "--opts", "MODEL.WEIGHTS", str(nband["weights"])])  # fmt: skip
    assert code == 0, caplog.text
    ids, crs, transform, size = _pred(out_pt / "scene_pred.tif")
    with rasterio.open(nband["raster"]) as ds:
        assert (crs, transform, size) == (ds.crs, ds.transform, (ds.height, ds.width))
    # the bands reached the model in its order, unscaled: the model's own probabilities on them
    with rasterio.open(out_pt / "scene_probs.tif") as ds:
        probs = ds.read().astype(np.float32) / 255.0  # (K, H, W)
    assert np.abs(probs - nband["ref"]).mean() < 0.004
    assert (ids == nband["ref"].argmax(0)).mean() >= 0.99
    assert (out_pt / "scene_overlay.png").is_file()

    onnx_path = nband["tmp"] / "model.onnx"
    tool = _load("export_onnx_nband", REPO / "tools/export_onnx.py")
    argv = ["--config-file", str(nband["config"]), "--weights", str(nband["weights"]),
            "--tile-size", str(TILE), "--output", str(onnx_path),
            "--verify-image", str(nband["raster"])]  # fmt: skip
    assert tool.run_main(tool.main, argv) == 0
    import onnx

    model = onnx.load(str(onnx_path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [4, TILE, TILE]
    meta = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert len(meta["standardization_mean"]) == len(meta["standardization_std"]) == 4
    assert meta["segclip_model_card"]["input"]["bands"] == BANDS
    assert OnnxSegmenter(str(onnx_path)).bands == BANDS

    code = _demo(["--onnx", str(onnx_path), "--output", str(out_onnx), *common])
    assert code == 0, caplog.text
    ids_onnx, crs_o, transform_o, size_o = _pred(out_onnx / "scene_pred.tif")
    assert (crs_o, transform_o, size_o) == (crs, transform, size)
    assert (ids_onnx == ids).mean() >= 0.99


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


def _refused(capsys, out: Path, name: str) -> str:
    """The run's one error line (naming ``name``); nothing was written to ``out``."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and name in err[-1], err
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())
    return err[-1]


def test_rgb_model_refuses_a_four_band_raster_without_bands(nband, tiny_config, capsys):
    """Bands that do not fit the model are a usage error found from the header: one line,
    exit 2, nothing written, also when another input of the run is fine."""
    raster = write_raster(nband["tmp"] / "plain.tif", nband["image"], BANDS, ["blue", "green",
                          "red", "nir"])  # fmt: skip
    good = write_raster(nband["tmp"] / "good.tif", nband["image"][..., :3], BANDS[:3], BANDS[:3])
    config = tiny_config(nband["tmp"])
    out = nband["tmp"] / "out_rgb"
    code = _demo(["--config-file", str(config), "--allow-random-weights", "--input", str(good),
                  str(raster), "--output", str(out)])  # fmt: skip
    assert code == 2
    line = _refused(capsys, out, "plain.tif")
    assert "--bands" in line
    # --bands fixes it
    code = _demo(["--config-file", str(config), "--allow-random-weights", "--input", str(raster),
                  "--output", str(out), "--bands", "3,2,1"])  # fmt: skip
    assert code == 0 and (out / "plain_pred.tif").is_file()


def test_four_band_model_refuses_a_three_band_raster(nband, capsys):
    raster = write_raster(
        nband["tmp"] / "rgb.tif", nband["image"][..., :3], BANDS[:3], ["red", "green", "blue"]
    )
    png = nband["tmp"] / "rgb.png"
    import cv2

    cv2.imwrite(str(png), np.ascontiguousarray(nband["image"][..., 2::-1]))
    base = ["--config-file", str(nband["config"]), "--input", str(raster), "--opts",
            "MODEL.WEIGHTS", str(nband["weights"])]  # fmt: skip
    out = nband["tmp"] / "out_3"
    assert _demo([*base[:4], "--output", str(out), *base[4:]]) == 2
    line = _refused(capsys, out, "rgb.tif")
    assert "1=red, 2=green, 3=blue" in line and "red,green,blue,nir" in line
    base[3] = str(png)  # an ordinary image: its header tells the 3 channels too
    assert _demo([*base[:4], "--output", str(out), *base[4:]]) == 2
    assert "red,green,blue,nir" in _refused(capsys, out, "rgb.png")
    base[3] = str(raster)
    # --bands with another count than the model's bands: one line, exit 2, nothing run
    code = _demo([*base[:4], "--output", str(nband["tmp"] / "out_b"), "--bands", "1,2,3",
                  *base[4:]])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --bands:") and "red,green,blue,nir" in err[-1]
    # a band number the raster lacks
    code = _demo([*base[:4], "--output", str(out), "--bands", "1,2,3,4", *base[4:]])
    assert code == 2
    assert "has 3 band(s)" in _refused(capsys, out, "rgb.tif")


def test_nband_int8_export_calibrates_on_the_model_bands(nband, tmp_path):
    """int8 of a 4-band model: calibration tiles are read with the model's bands by name (the
    raster stores NIR first), and the int8 file takes 4 channels and runs in the demo."""
    import onnx

    from segclip_d2.deploy.quantize import calibration_tiles

    calib = tmp_path / "calib"
    calib.mkdir()
    write_raster(calib / "a.tif", nband["image"], BANDS, FILE_ORDER)
    tiles = calibration_tiles(str(calib), TILE, 4, BANDS, "as_read")
    assert tiles.shape == (1, TILE, TILE, 4)
    np.testing.assert_array_equal(tiles[0], nband["image"])

    tool = _load("export_onnx_nband_int8", REPO / "tools/export_onnx.py")
    onnx_path = tmp_path / "m.onnx"
    argv = ["--config-file", str(nband["config"]), "--weights", str(nband["weights"]),
            "--tile-size", str(TILE), "--output", str(onnx_path), "--int8", str(calib),
            "--verify-image", str(nband["raster"]), "--min-agreement-int8", "0"]  # fmt: skip
    assert tool.run_main(tool.main, argv) == 0
    int8 = tmp_path / "m.int8.onnx"
    model = onnx.load(str(int8))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [4, TILE, TILE]
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    out = tmp_path / "out_int8"
    assert _demo(["--onnx", str(int8), "--output", str(out), "--input", str(nband["raster"]),
                  "--block-size", str(TILE)]) == 0  # fmt: skip
    assert (out / "scene_pred.tif").is_file()
