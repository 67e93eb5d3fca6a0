"""demo/demo.py end to end with a tiny randomly initialised SegCLIP: image and GeoTIFF outputs,
bad inputs, custom vocabularies."""

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from segclip_d2.data.dataset_facts import get_facts

LOVEDA = get_facts("loveda")
K = LOVEDA.num_classes


def blank_png(folder: Path, size: int) -> Path:
    path = folder / "a.png"
    cv2.imwrite(str(path), np.zeros((size, size, 3), np.uint8))
    return path


def run_demo(demo, config, folder: Path, image: Path, *extra: str, head: str = "linear") -> int:
    """demo.main on ``image`` with the tiny ``head`` config, outputs in ``folder / "out"``
    (random weights allowed: the tiny model is never trained)."""
    config = str(config(folder, head))
    out = str(folder / "out")
    argv = ["--config-file", config, "--input", str(image), "--output", out, *extra]
    return demo.main(argv[:6] + ["--allow-random-weights"] + argv[6:])


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, shared_data, demo, tiny_config, write_geotiff):
    """One demo run over a crop of a real LoveDA tile, a GeoTIFF and a corrupt PNG (and, kept
    outside the folder, an unsupported 2-band TIFF)."""
    import rasterio

    shared = shared_data / "loveda" / "images" / "0.png"
    if not shared.is_file():
        pytest.skip(f"real LoveDA tile not found at {shared}")
    tmp = tmp_path_factory.mktemp("demo")
    inputs = tmp / "inputs"
    inputs.mkdir()
    # A 64x120 crop of the real tile keeps the test fast (the model runs at full resolution).
    real = cv2.imread(str(shared))[300:364, 200:320]
    cv2.imwrite(str(inputs / "tile.png"), real)
    transform = write_geotiff(inputs / "scene.tif", height=100, width=60)
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with rasterio.open(
        tmp / "twoband.tif", "w", driver="GTiff", height=20, width=20, count=2, dtype="uint8"
    ) as ds:
        ds.write(np.zeros((2, 20, 20), np.uint8))
    out = tmp / "out"
    caplog = logging.getLogger()
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep(level=logging.INFO)
    caplog.addHandler(handler)
    try:
        code = demo.main(
            [
                "--config-file",
                str(tiny_config(tmp)),
                "--input",
                str(inputs),
                "--output",
                str(out),
                "--no-progress",
                "--allow-random-weights",
                "--block-size",
                "64",
                "--block-margin",
                "8",
            ]
        )
    finally:
        caplog.removeHandler(handler)
    return {
        "code": code,
        "out": out,
        "config": tiny_config(tmp),
        "inputs": inputs,
        "twoband": tmp / "twoband.tif",
        "log": "\n".join(records),
        "transform": transform,
        "real": real[:, :, ::-1],
    }


def test_demo_writes_all_outputs_for_a_real_tile(demo_run):
    out, rgb = demo_run["out"], demo_run["real"]
    pred = cv2.imread(str(out / "tile_pred.png"), cv2.IMREAD_UNCHANGED)
    color = cv2.imread(str(out / "tile_color.png"))[:, :, ::-1]
    over = cv2.imread(str(out / "tile_overlay.png"))[:, :, ::-1]
    assert pred.shape == rgb.shape[:2] and pred.dtype == np.uint8
    assert pred.max() < K
    assert color.shape == over.shape == rgb.shape
    np.testing.assert_array_equal(color, LOVEDA.colorize(pred))
    # The overlay is the 50/50 blend of image and colour map.
    blend = (rgb.astype(np.float32) * 0.5 + color.astype(np.float32) * 0.5).round()
    assert np.abs(over.astype(np.float32) - blend).max() <= 1
    legend = cv2.imread(str(out / "legend.png"))
    assert legend is not None and legend.shape[0] > 28 * K
    # No temp files left behind.
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_demo_geotiff_keeps_crs_transform_nodata_and_colour_table(demo_run):
    import rasterio

    out = demo_run["out"]
    with rasterio.open(out / "scene_pred.tif") as ds:
        assert ds.crs.to_epsg() == 32633
        assert ds.transform == demo_run["transform"]
        assert ds.nodata == 255 and ds.count == 1 and ds.dtypes[0] == "uint8"
        assert (ds.height, ds.width) == (100, 60)
        ids = ds.read(1)
        cmap = ds.colormap(1)
    assert (ids[:10] == 255).all(), "no-data rows must get the nodata class"
    assert ids[10:].max() < K
    for i, c in enumerate(LOVEDA.colors):
        assert cmap[i][:3] == tuple(c)
    assert cmap[255][3] == 0
    # Previews of the GeoTIFF (small, so at full size) and no class-id PNG.
    color = cv2.imread(str(out / "scene_color.png"))[:, :, ::-1]
    np.testing.assert_array_equal(color[10:], LOVEDA.colorize(ids)[10:])
    assert (color[:10] == 0).all()
    assert (out / "scene_overlay.png").is_file() and not (out / "scene_pred.png").exists()


def test_demo_reports_bad_inputs_and_processes_the_others(demo_run):
    out, log = demo_run["out"], demo_run["log"]
    assert demo_run["code"] == 1
    assert "broken.png" in log and "cannot be decoded" in log
    assert not list(out.glob("broken_*"))
    assert (out / "tile_pred.png").is_file() and (out / "scene_pred.tif").is_file()


def test_demo_refuses_a_run_with_an_input_of_unfit_bands(demo_run, demo, tmp_path, capsys):
    """A raster whose bands the model cannot take without --bands is a usage error, not a
    failed input: one line naming it, exit 2, before any output is written."""
    out = tmp_path / "out"
    argv = ["--config-file", str(demo_run["config"]), "--input", str(demo_run["inputs"]),
            str(demo_run["twoband"]), "--output", str(out), "--no-progress",
            "--allow-random-weights"]  # fmt: skip
    assert demo.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "twoband.tif" in err[-1] and "--bands" in err[-1]
    assert not out.exists() or not any(out.iterdir())


def test_demo_classes_needs_the_text_head(demo, tiny_config, tmp_path, capsys):
    code = run_demo(demo, tiny_config, tmp_path, blank_png(tmp_path, 32), "--classes", "road,water")
    assert code == 2
    err = capsys.readouterr().err
    assert "error: --classes:" in err and "CLASS_HEAD text" in err and "linear" in err


def test_demo_custom_vocabulary_with_text_head_tta_and_bf16(demo, tiny_config, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    img = tmp_path / "gray.png"
    g = np.random.default_rng(1)
    cv2.imwrite(str(img), g.integers(0, 65535, (40, 56), dtype=np.uint16))  # 16-bit grayscale
    code = demo.main(
        [
            "--config-file",
            str(tiny_config(tmp_path, "text")),
            "--input",
            str(img),
            "--output",
            str(tmp_path / "out"),
            "--classes",
            "road, water ,tennis court",
            "--tta",
            "--precision",
            "bf16",
            "--no-progress",
            "--allow-random-weights",
            "--opts",
            "TEST.TTA.ROTATIONS",
            "[]",
        ]
    )
    assert code == 0
    # --tta with rotations switched off: identity + 2 flips; --precision reaches the inferencer.
    assert "views=3" in caplog.text and "precision=bf16" in caplog.text
    pred = cv2.imread(str(tmp_path / "out" / "gray_pred.png"), cv2.IMREAD_UNCHANGED)
    assert pred.shape == (40, 56) and pred.max() < 3
    color = cv2.imread(str(tmp_path / "out" / "gray_color.png"))[:, :, ::-1]
    # "road" and "water" keep their LoveDA colours.
    for cls, name in ((0, "road"), (1, "water")):
        if (pred == cls).any():
            assert tuple(color[pred == cls][0]) == LOVEDA.colors[LOVEDA.classes.index(name)]


def test_expand_inputs_folders_globs_and_missing(tmp_path):
    from segclip_d2.geo.batch import expand_inputs

    for n in ("b.png", "a.tif", "notes.txt"):
        (tmp_path / n).write_bytes(b"x")
    files, missing = expand_inputs(
        [
            str(tmp_path),
            str(tmp_path / "*.png"),
            str(tmp_path / "nope.png"),
            str(tmp_path / "*.jp2"),
        ]
    )
    assert [f.name for f in files] == ["a.tif", "b.png"]
    assert [m[0] for m in missing] == [str(tmp_path / "nope.png"), str(tmp_path / "*.jp2")]


def test_demo_unreachable_remote_weights_give_one_clear_error(demo, tiny_config, tmp_path, capsys):
    """A remote MODEL.WEIGHTS that cannot be fetched (here: a refused local port, as offline)
    fails at once with an error naming the file and the ways out; nothing is written."""
    url = "http://127.0.0.1:9/segclip_test_weights.pth"
    code = run_demo(
        demo, tiny_config, tmp_path, blank_png(tmp_path, 32), "--opts", "MODEL.WEIGHTS", url
    )
    assert code == 2
    err = capsys.readouterr().err
    assert f"error: MODEL.WEIGHTS {url}: could not be downloaded" in err
    assert 'MODEL.WEIGHTS ""' in err and "local path" in err
    assert not any((tmp_path / "out").glob("*_pred.png"))


def test_weight_error_explanation_leaves_local_and_other_errors_alone():
    from segclip_d2.checkpoint.checkpointer import (
        WeightsUnavailableError,
        explain_weight_fetch_errors,
    )

    with pytest.raises(FileNotFoundError):
        with explain_weight_fetch_errors("/no/such/model.pth"):
            raise FileNotFoundError("/no/such/model.pth")
    with pytest.raises(KeyError):
        with explain_weight_fetch_errors("https://example.org/model.pth"):
            raise KeyError("not a download problem")
    with pytest.raises(WeightsUnavailableError, match="https://example.org/m.pth"):
        with explain_weight_fetch_errors("https://example.org/m.pth"):
            raise ConnectionResetError("reset")


def test_demo_rejects_a_checkpoint_that_does_not_fit_the_config(
    demo, tiny_config, tmp_path, capsys
):
    """Weights trained with another config (here: the linear class head, loaded into a model
    with the text head) are refused with the file and the differing parameters named, instead
    of running with the unmatched parameters left random."""
    import torch

    from segclip_d2.predict.load import load_model

    _, model = load_model(
        tiny_config(tmp_path, "linear"), allow_random_weights=True, optimize=False
    )
    ckpt = tmp_path / "linear_head.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    img = blank_png(tmp_path, 64)
    weights = ("--opts", "MODEL.WEIGHTS", str(ckpt))
    bad = run_demo(demo, tiny_config, tmp_path, img, *weights, head="text")
    assert bad == 2
    err = capsys.readouterr().err
    assert f"error: checkpoint {ckpt}: does not fit the model" in err
    assert "class_head" in err
    assert not any((tmp_path / "out").glob("*_pred.png"))
    # the config it was trained with loads it
    good = run_demo(demo, tiny_config, tmp_path, img, *weights, head="linear")
    assert good == 0 and (tmp_path / "out" / "a_pred.png").is_file()
