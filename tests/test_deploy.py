"""Self-describing checkpoints (model card), inference from stored text embeddings, ONNX export
with its round trip, and the torch-free ``demo/demo.py --onnx`` path."""

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from test_train import TINY_MODEL_OPTS

import segclip_d2.modeling.meta_arch  # noqa: F401
from segclip_d2.checkpoint import pretrained as weights
from segclip_d2.checkpoint.card import CARD_KEY, build_model_card
from segclip_d2.checkpoint.checkpointer import InferenceCheckpointer, ModelCardCheckpointer
from segclip_d2.checkpoint.files import read_checkpoint
from segclip_d2.config import load_config

REPO = Path(__file__).resolve().parents[1]
TILE = 64
TINY = TINY_MODEL_OPTS + ["INPUT.CROP.SIZE", "(64, 64)", "INPUT.GSD_M", "0.3"]


def tiny_cfg(*opts):
    return load_config(str(REPO / "configs" / "synthetic" / "segclip_cpu.yaml"), TINY + list(opts))


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def real_crop(shared_data: Path, size: int) -> np.ndarray:
    """A ``size`` x ``size`` BGR crop of a real LoveDA tile (buildings, roads and fields)."""
    tile = cv2.imread(str(shared_data / "loveda" / "images" / "0.png"))
    assert tile is not None
    return np.ascontiguousarray(tile[300 : 300 + size, 200 : 200 + size])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model (random init, text encoder random init) saved by the training
    checkpointer with its card, and the model's own predictions."""
    out = tmp_path_factory.mktemp("ckpt")
    cfg = tiny_cfg("OUTPUT_DIR", str(out), "MODEL.SEGCLIP.TEXT.PRETRAINED", "")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    metrics = {"sem_seg/mIoU": 42.5}
    ckpt = ModelCardCheckpointer(
        model, str(out), card_fn=lambda extra: build_model_card(cfg, model, metrics, 3)
    )
    ckpt.save("model_final", iteration=3)
    (out / "config.yaml").write_text(cfg.dump())
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 64, 64))).float()
    with torch.no_grad():
        probs = model.predict_sem_seg_probs(images)
    return {"dir": out, "path": out / "model_final.pth", "cfg": cfg, "model": model,
            "images": images, "probs": probs}  # fmt: skip


def test_checkpoint_carries_the_model_card(trained):
    card = read_checkpoint(trained["path"])[CARD_KEY]
    model = trained["model"]
    assert card["class_names"] == model.class_names and len(card["colors"]) == 7
    assert card["prompts"][2] == "a photo with a road"
    assert card["prompt_template"] == "a photo with a {}"
    emb = torch.tensor(card["text_embeddings"])
    assert emb.shape == (7, 1024) and torch.equal(emb, model.text_embeddings())
    assert card["text_encoder"]["open_clip_model"] == "RN50"
    assert card["text_encoder"]["random_init"] is True
    assert card["input"]["pixel_mean"] == [123.675, 116.28, 103.53]
    assert card["training"] == {
        "datasets": ["synthetic_aerial_train"], "crop_size": [64, 64], "gsd_m": 0.3, "iteration": 3
    }  # fmt: skip
    assert card["metrics"] == {"sem_seg/mIoU": 42.5}
    assert "NUM_QUERIES: 10" in card["config"] and card["project_version"]
    json.dumps(card)  # JSON types only (the ONNX export embeds it)


def test_model_card_tool_prints_the_card_and_rejects_bad_files(trained, tmp_path, capsys):
    tool = load_tool("model_card")
    assert tool.run_main(tool.main, [str(trained["path"])]) == 0
    text = capsys.readouterr().out
    for expected in ("synthetic_aerial_train", "0.3 m/px (30 cm/px)", "64x64", "road",
                     "#ff0000", "sem_seg/mIoU: 42.5000", "7 x 1024 stored"):  # fmt: skip
        assert expected in text, expected
    assert tool.run_main(tool.main, [str(tmp_path / "missing.pth")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "missing.pth" in err[0]
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    assert tool.run_main(tool.main, [str(bad)]) == 2
    assert "bad.pth: cannot be read" in capsys.readouterr().err


def test_offline_evaluation_with_required_openai_weights_uses_the_stored_embeddings(
    trained, tmp_path, monkeypatch
):
    """No CLIP weights anywhere, REQUIRE_PRETRAINED True: the checkpoint alone predicts, exactly
    as the process that trained it."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(weights, "_RESOLVED", {})
    cfg = tiny_cfg(
        *(
            "MODEL.SEGCLIP.TEXT.PRETRAINED",
            "openai",
            "MODEL.SEGCLIP.TEXT.REQUIRE_PRETRAINED",
            "True",
        )
    )
    model = build_model(cfg).eval()
    InferenceCheckpointer(model).load(str(trained["path"]))
    with torch.no_grad():
        probs = model.predict_sem_seg_probs(trained["images"])
    assert torch.equal(probs, trained["probs"])
    assert not model.text_encoder.loaded  # CLIP was never needed
    # Without the card the same setup must fail: the weights are required and missing.
    bare = build_model(cfg).eval()
    state = read_checkpoint(trained["path"])
    del state[CARD_KEY]
    torch.save(state, tmp_path / "nocard.pth")
    InferenceCheckpointer(bare).load(str(tmp_path / "nocard.pth"))
    with pytest.raises(weights.PretrainedWeightsError, match="offline"):
        bare.predict_sem_seg_probs(trained["images"])


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory, shared_data):
    """tools/export_onnx.py on the tiny checkpoint, verified on a real LoveDA crop."""
    tmp = tmp_path_factory.mktemp("onnx")
    crop = tmp / "crop.png"
    cv2.imwrite(str(crop), real_crop(shared_data, TILE))
    scene = tmp / "scene.png"  # more than two tiles each way: the Deepness check pads it
    cv2.imwrite(str(scene), real_crop(shared_data, 170)[:150])
    calib = tmp / "calibration"  # int8 calibration: real LoveDA imagery
    calib.mkdir()
    full = cv2.imread(str(shared_data / "loveda" / "images" / "1.png"))
    cv2.imwrite(str(calib / "a.png"), full[:128, :192])
    cv2.imwrite(str(calib / "b.png"), full[500:628, 600:792])
    out = tmp / "model.onnx"
    tool = load_tool("export_onnx")
    argv = ["--config-file", str(trained["dir"] / "config.yaml"), "--weights",
            str(trained["path"]), "--tile-size", str(TILE), "--output", str(out),
            "--verify-image", str(scene), "--int8", str(calib)]  # fmt: skip
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = tool.run_main(tool.main, argv)
    return {"tool": tool, "argv": argv, "path": out, "crop": crop, "tmp": tmp, "code": code,
            "stdout": printed.getvalue(), "int8": tmp / "model.int8.onnx"}  # fmt: skip


def test_export_round_trip_on_a_real_loveda_crop(exported):
    assert exported["code"] == 0, exported["stdout"]
    lines = exported["stdout"].splitlines()
    line = next(x for x in lines if x.startswith("fp32 round trip on"))
    agreement = float(line.split("top-1 agreement ")[1].split("%")[0])
    assert agreement >= 99.9, line
    assert "scene.png" in line and exported["path"].is_file()
    # the Deepness-style check: 50% of 64 px = 32 px overlap, stride 32, 150x170 -> 160x192
    line = next(x for x in lines if x.startswith("fp32 Deepness tiling on"))
    assert "150x170 px, overlap 50% = 32 px, stride 32, black-padded to 160x192, 4x5 tiles" in line
    assert float(line.split("own windows ")[1].split("%")[0]) > 0


def test_exported_file_meets_the_deepness_contract(exported, trained):
    import onnx
    import onnxruntime as ort

    from segclip_d2.deploy.export import float64_tensors, nonstandard_ops

    path = exported["path"]
    assert exported["code"] == 0, exported["stdout"]
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert float64_tensors(model) == [] and nonstandard_ops(model) == []
    assert "GridSample" in {n.op_type for n in model.graph.node}
    meta = {p.key: json.loads(p.value) for p in model.metadata_props}
    for key in ("model_type", "class_names", "resolution", "tile_size", "tiles_size",
                "tiles_overlap", "standardization_mean", "standardization_std", "seg_thresh",
                "seg_small_segment", "segclip_model_card"):  # fmt: skip
        assert key in meta, key
    assert meta["model_type"] == "Segmentor"
    assert meta["class_names"] == {str(i): n for i, n in enumerate(trained["model"].class_names)}
    assert meta["resolution"] == pytest.approx(30.0)
    assert meta["tile_size"] == meta["tiles_size"] == TILE
    assert meta["standardization_mean"] == pytest.approx([0.485, 0.456, 0.406], abs=1e-6)
    assert meta["segclip_model_card"]["training"]["gsd_m"] == 0.3
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = sess.get_inputs(), sess.get_outputs()
    assert inp.shape[1:] == [3, TILE, TILE] and not isinstance(inp.shape[0], int)
    assert inp.type == "tensor(float)"
    x = np.random.default_rng(1).standard_normal((3, 3, TILE, TILE)).astype(np.float32)
    probs = sess.run(None, {inp.name: x})[0]
    assert probs.shape == (3, 7, TILE, TILE) and outp.shape[1:] == [7, TILE, TILE]
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert probs.min() >= 0


def test_int8_export_carries_the_metadata_and_keeps_the_sampling_in_float(exported):
    import onnx

    from segclip_d2.deploy.export import float64_tensors, nonstandard_ops
    from segclip_d2.deploy.quantize import float_nodes

    assert exported["code"] == 0, exported["stdout"]
    lines = exported["stdout"].splitlines()
    assert any(x.startswith("int8 round trip on") for x in lines), exported["stdout"]
    assert any(x.startswith("int8 Deepness tiling on") for x in lines), exported["stdout"]
    fp32, int8 = onnx.load(str(exported["path"])), onnx.load(str(exported["int8"]))
    onnx.checker.check_model(int8)
    assert float64_tensors(int8) == [] and nonstandard_ops(int8) == []
    meta = {p.key: p.value for p in fp32.metadata_props}
    assert {p.key: p.value for p in int8.metadata_props} == meta
    producers = {out: n for n in int8.graph.node for out in n.output}
    ops = [n.op_type for n in int8.graph.node]
    assert ops.count("DequantizeLinear") > 10 and "QuantizeLinear" in ops
    conv_inputs = [producers.get(i) for n in int8.graph.node if n.op_type == "Conv"
                   for i in n.input[:2]]  # fmt: skip
    assert all(p is not None and p.op_type == "DequantizeLinear" for p in conv_inputs)
    kept = float_nodes(fp32)  # the deformable sampling's projections read float tensors only
    offsets = [name for name in kept if "attention_weights" not in name]
    assert len(offsets) >= 1 and len(kept) == 2 * len(offsets), kept
    for node in int8.graph.node:
        if node.op_type == "GridSample" or node.name in kept:
            for name in node.input:
                assert producers.get(name) is None or producers[name].op_type not in (
                    "DequantizeLinear",
                    "QuantizeLinear",
                ), node.name
    assert sum(n.name in kept for n in int8.graph.node) == len(kept)
    assert os.path.getsize(exported["int8"]) < 0.5 * os.path.getsize(exported["path"])


def test_int8_file_runs_in_the_demo_predictor(exported):
    """OnnxSegmenter (what demo --onnx runs) takes the int8 file with the same call."""
    from segclip_d2.deploy.onnx_predictor import OnnxSegmenter

    rgb = cv2.imread(str(exported["crop"]))[:, :, ::-1]
    valid = np.ones(rgb.shape[:2], bool)
    valid[:5] = False
    fp32, int8 = OnnxSegmenter(str(exported["path"])), OnnxSegmenter(str(exported["int8"]))
    assert int8.class_names == fp32.class_names and int8.tile_size == TILE
    ids, probs = int8(rgb, valid)
    assert ids.shape == (TILE, TILE) and (ids[:5] == 255).all() and (ids[5:] < 7).all()
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)
    agreement = (ids[5:] == fp32(rgb, valid)[0][5:]).mean()
    assert agreement > 0.5, agreement  # tiny random model; real figures: tools/benchmark_onnx.py


def test_export_fails_loudly_when_the_round_trip_disagrees(exported, capsys):
    tool = exported["tool"]
    out = exported["tmp"] / "strict.onnx"
    argv = [a if a != str(exported["path"]) else str(out) for a in exported["argv"]]
    assert tool.run_main(tool.main, argv + ["--min-agreement", "100.1"]) == 1
    assert "VERIFICATION FAILED" in capsys.readouterr().err
    assert not out.exists() and not list(out.parent.glob(".strict.onnx.tmp-*"))
    assert tool.run_main(tool.main, argv[:3] + ["missing.pth"] + argv[4:]) == 2


def test_export_refuses_a_model_optimised_for_inference(trained, tmp_path):
    """The CPU execution tricks are not part of the network: export takes the plain model."""
    from segclip_d2.deploy.export import export_onnx
    from segclip_d2.predict.optimize import inference_copy

    fast = inference_copy(trained["model"], "cpu")
    out = tmp_path / "fast.onnx"
    with pytest.raises(ValueError, match="plain model.*optimised for inference"):
        export_onnx(fast, {}, TILE, str(out), resolution_cm=30.0)
    assert not out.exists()


BLOCKER = '''
import sys

class _NoTorch:
    """Importing torch / detectron2 raises, as on a machine where they are not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "detectron2"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None

sys.meta_path.insert(0, _NoTorch())
'''


def test_demo_onnx_runs_without_torch(exported, tmp_path, write_geotiff):
    path = exported["path"]
    assert exported["code"] == 0, exported["stdout"]
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), str(REPO)]))
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True)
    assert probe.returncode != 0 and b"blocked" in probe.stderr  # the blocker works
    inputs = tmp_path / "in"
    inputs.mkdir()
    crop = cv2.imread(str(exported["crop"]))
    cv2.imwrite(str(inputs / "tile.png"), np.concatenate([crop, crop[:, :40]], 1))  # 64 x 104
    transform = write_geotiff(inputs / "scene.tif", height=80, width=70)
    out = tmp_path / "out"
    code = (
        "import sys, runpy; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(REPO / "demo" / "demo.py"),
            "--onnx",
            str(path),
            "--input",
            str(inputs),
            "--output",
            str(out),
            "--no-progress",
            "--block-size",
            "64",
            "--block-margin",
            "8",
        ],  # fmt: skip
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "torch" not in run.stderr.replace("without torch", "")
    for name in ("tile_pred.png", "tile_color.png", "tile_overlay.png", "scene_pred.tif",
                 "scene_color.png", "scene_overlay.png", "legend.png"):  # fmt: skip
        assert (out / name).is_file(), name
    ids = cv2.imread(str(out / "tile_pred.png"), cv2.IMREAD_UNCHANGED)
    assert ids.shape == (64, 104) and ids.max() < 7
    import rasterio

    with rasterio.open(out / "scene_pred.tif") as ds:
        assert ds.crs.to_epsg() == 32633 and ds.transform == transform and ds.nodata == 255
        pred = ds.read(1)
    assert (pred[:10] == 255).all() and (pred[10:] < 7).all()
    # Same ids as the in-process predictor on the same image (the whole image is one block)
    from segclip_d2.deploy.onnx_predictor import OnnxSegmenter

    seg = OnnxSegmenter(str(path))
    rgb = cv2.imread(str(inputs / "tile.png"))[:, :, ::-1]
    np.testing.assert_array_equal(ids[:, :64], seg(rgb, np.ones(rgb.shape[:2], bool))[0][:, :64])


def test_benchmark_onnx_compares_fp32_and_int8_in_their_own_processes(exported, tmp_path, capsys):
    assert exported["code"] == 0, exported["stdout"]
    tool = load_tool("benchmark_onnx")
    images = tmp_path / "images"
    images.mkdir()
    crop = cv2.imread(str(exported["crop"]))
    cv2.imwrite(str(images / "a.png"), np.concatenate([crop, crop[::-1]], 1))  # 64 x 128
    out = tmp_path / "bench.json"
    argv = ["--models", str(exported["path"]), str(exported["int8"]), "--images", str(images),
            "--tiles", "2", "--rounds", "1", "--threads", "1", "--overlaps", "15", "50",
            "--json", str(out)]  # fmt: skip
    assert tool.run_main(tool.main, argv) == 0
    res = json.loads(out.read_text())
    fp32, int8 = res["models"]
    assert fp32["agreement"] == 1.0 and fp32["speedup"] == 1.0 and fp32["peak_rss_mib"] > 10
    assert 0.5 < int8["agreement"] <= 1.0 and int8["mib"] < fp32["mib"]
    sweep = res["deepness_overlaps"]
    assert [r["overlap_percent"] for r in sweep] == [15, 50] and sweep[1]["tiles"] == 3
    assert "ms/tile" in capsys.readouterr().out
    assert tool.run_main(tool.main, ["--models", str(tmp_path / "no.onnx"), "--images", "."]) == 2


def test_resolution_from_opts_or_flag_and_refused_when_unknown(trained, tmp_path, capsys):
    """A checkpoint and config without a GSD: refused (exit 2, nothing written) unless
    --opts INPUT.GSD_M 0.3 or --resolution-cm 30 gives it; both write resolution 30."""
    import onnx

    state = read_checkpoint(trained["path"])
    state[CARD_KEY]["training"]["gsd_m"] = None
    torch.save(state, tmp_path / "nogsd.pth")
    cfg = trained["cfg"].clone()
    cfg.defrost()
    cfg.INPUT.GSD_M = 0.0
    (tmp_path / "config.yaml").write_text(cfg.dump())
    tool = load_tool("export_onnx")
    out = tmp_path / "m.onnx"
    argv = ["--config-file", str(tmp_path / "config.yaml"), "--weights",
            str(tmp_path / "nogsd.pth"), "--tile-size", str(TILE), "--output", str(out),
            "--no-verify"]  # fmt: skip
    assert tool.run_main(tool.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "resolution is unknown" in err[0] and "--resolution-cm" in err[0]
    assert not out.exists() and not list(tmp_path.glob(".m.onnx.tmp-*"))
    for extra in (["--opts", "INPUT.GSD_M", "0.3"], ["--resolution-cm", "30"]):
        assert tool.run_main(tool.main, argv + extra) == 0
        meta = {p.key: json.loads(p.value) for p in onnx.load(str(out)).metadata_props}
        assert meta["resolution"] == pytest.approx(30.0) and meta["seg_thresh"] == 0
        out.unlink()
