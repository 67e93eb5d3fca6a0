"""demo/demo.py's error contract, one table row per case: exit code, one line naming the file or
key, no traceback, and what is (not) left in --output. Runs ``demo.main(argv)`` in-process."""

import os
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from segclip_d2.utils.atomic import temp_name


def _png(t: Path) -> str:
    path = t / "in.png"
    g = np.random.default_rng(0)
    cv2.imwrite(
        str(path), cv2.GaussianBlur(g.integers(0, 255, (48, 40, 3), dtype=np.uint8), (5, 5), 2)
    )
    return str(path)


def _corrupt_pth(t: Path) -> str:
    (t / "model_final.pth").write_bytes(b"PK\x03\x04 cut short")
    return str(t / "model_final.pth")


def _file(t: Path) -> str:
    (t / "taken").write_text("x")
    return str(t / "taken")


def _base(t: Path, output=None, weights=True, head="linear") -> list[str]:
    """The tiny config (written by the test) on one PNG."""
    argv = ["--config-file", str(t / f"tiny_{head}.yaml"), "--input", _png(t), "--no-progress"]
    argv += ["--output", output or str(t / "out")]
    return argv + (["--allow-random-weights"] if weights else [])


def tiny_onnx(path: Path, half_resolution=False, tile=16, k=3) -> Path:
    """A hand-built ONNX "model" in the export's format: (1, 3, S, S) -> (1, K, S, S) softmax of
    the first K normalised channels (K <= 3), or average-pooled to half the resolution."""
    import json

    import onnx
    from onnx import TensorProto, helper

    s2 = tile // 2 if half_resolution else tile
    inits = [
        helper.make_tensor(n, TensorProto.INT64, [1], [v])
        for n, v in (("start", 0), ("end", k), ("axis", 1))
    ]
    nodes = [
        helper.make_node("Slice", ["image", "start", "end", "axis"], ["first_k"]),
        helper.make_node("Softmax", ["first_k"], ["soft"], axis=1),
    ]
    if half_resolution:
        nodes.append(
            helper.make_node(
                "AveragePool", ["soft"], ["probs"], kernel_shape=[2, 2], strides=[2, 2]
            )
        )
    else:
        nodes.append(helper.make_node("Identity", ["soft"], ["probs"]))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, tile, tile])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, k, s2, s2])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = {
        "class_names": {str(i): n for i, n in enumerate(["red", "green", "blue"][:k])},
        "standardization_mean": [0.5, 0.5, 0.5],
        "standardization_std": [0.25, 0.25, 0.25],
    }
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(model, str(path))
    return path


def _onnx(t: Path, half=False) -> list[str]:
    model = tiny_onnx(t / ("half.onnx" if half else "tiny.onnx"), half_resolution=half)
    return ["--onnx", str(model), "--input", _png(t), "--output", str(t / "out"), "--no-progress"]


ELEVEN = ",".join(f"class{i}" for i in range(11))


# (id, argv given tmp, texts the one-line message must contain)
CASES = [
    (
        "no-config-file",
        lambda t: ["--input", _png(t), "--output", str(t / "out")],
        ["--config-file"],
    ),
    (
        "missing-config",
        lambda t: ["--config-file", str(t / "no.yaml"), "--input", "x", "--output", str(t / "out")],
        ["no.yaml", "no such config file"],
    ),
    (
        "odd-opts",
        lambda t: _base(t) + ["--opts", "MODEL.WEIGHTS"],
        ["config overrides", "each KEY needs a VALUE"],
    ),
    (
        "unknown-opts-key",
        lambda t: _base(t) + ["--opts", "TEST.MODEE", "slide"],
        ["TEST.MODEE", "did you mean TEST.MODE?"],
    ),
    ("bad-bands", lambda t: _base(t) + ["--bands", "3,x"], ["--bands", "3,x"]),
    ("bad-block", lambda t: _base(t) + ["--block-size", "0"], ["--block-size", "> 0"]),
    ("output-is-a-file", lambda t: _base(t, output=_file(t)), ["--output", "not a folder"]),
    (
        "weights-missing",
        lambda t: _base(t) + ["--opts", "MODEL.WEIGHTS", str(t / "gone.pth")],
        ["MODEL.WEIGHTS", "gone.pth", "no such file"],
    ),
    (
        "random-refused",
        lambda t: _base(t, weights=False),
        ["MODEL.WEIGHTS", "randomly initialised", "--allow-random-weights"],
    ),
    (
        "corrupt-pth",
        lambda t: _base(t) + ["--opts", "MODEL.WEIGHTS", _corrupt_pth(t)],
        ["model_final.pth", "truncated or corrupt"],
    ),
    # issue 20, item 7: values checked as they are parsed or loaded
    (
        "more-classes-than-queries",
        lambda t: _base(t, head="text") + ["--classes", ELEVEN],
        ["--classes", "11 classes", "10 queries"],
    ),
    ("gsd-nan", lambda t: _base(t) + ["--gsd", "nan"], ["--gsd", "'nan'"]),
    ("gsd-inf", lambda t: _base(t) + ["--gsd", "inf"], ["--gsd", "'inf'"]),
    ("gsd-tiny", lambda t: _base(t) + ["--gsd", "1e-9"], ["--gsd", "0.01 to 1000"]),
    ("alpha-5", lambda t: _base(t) + ["--alpha", "5"], ["--alpha", "0..1"]),
    ("alpha-nan", lambda t: _base(t) + ["--alpha", "nan"], ["--alpha", "finite"]),
    ("margin-negative", lambda t: _base(t) + ["--block-margin", "-8"], ["--block-margin"]),
    ("old-blend-name", lambda t: _base(t) + ["--block-blend", "taper"], ["--block-blend", "crop"]),
    ("onnx-half-resolution", lambda t: _onnx(t, half=True), ["half.onnx", "(1, 3, 8, 8)"]),
    ("onnx-with-opts", lambda t: _onnx(t) + ["--tta"], ["--onnx", "PyTorch options"]),
    # issue 20, item 8
    (
        "duplicate-classes",
        lambda t: _base(t, head="text") + ["--classes", "road,water,Road"],
        ["--classes", "'Road' given twice"],
    ),
]


@pytest.mark.parametrize("case,argv,texts", CASES, ids=[c[0] for c in CASES])
def test_user_error_is_one_line_exit_2(demo, tiny_config, tmp_path, capsys, case, argv, texts):
    tiny_config(tmp_path, "linear")
    tiny_config(tmp_path, "text")
    args = argv(tmp_path)
    assert demo.main(args) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    for text in texts:
        assert text in lines[0], (text, lines[0])
    assert "Traceback" not in err and "weights_only" not in err
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir()), "no output before the checks pass"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output(demo, tiny_config, tmp_path, capsys):
    tiny_config(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert demo.main(_base(tmp_path, output=str(locked / "out"))) == 2
    assert "--output" in capsys.readouterr().err and not (locked / "out").exists()


def test_truncated_jpeg_is_a_failed_input_and_dead_temps_go(demo, tiny_config, tmp_path, capsys):
    """A truncated JPEG (OpenCV would fill it with grey) fails with exit 1 and leaves no output
    of its own; the good input is written. Temps of a killed earlier run are removed, those of
    a live writer (another rank) are kept."""
    good = _png(tmp_path)
    ok, buf = cv2.imencode(".jpg", cv2.imread(good))
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(buf.tobytes()[: len(buf) // 2])
    out = tmp_path / "out"
    out.mkdir()
    live = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    temps = {}
    for name, proc in (("live", live), ("dead", dead)):
        tmp = temp_name(out / f"{name}_pred.tif")
        tmp = tmp.with_name(tmp.name.replace(f"-{os.getpid()}-", f"-{proc.pid}-"))
        tmp.write_bytes(b"partial")
        temps[name] = tmp
    try:
        argv = ["--config-file", str(tiny_config(tmp_path)), "--input", good, str(cut)]
        code = demo.main(argv + ["--output", str(out), "--no-progress", "--allow-random-weights"])
    finally:
        live.kill()
        live.wait()
    assert code == 1
    assert (out / "in_pred.png").is_file() and not list(out.glob("cut_*"))
    assert temps["live"].exists() and not temps["dead"].exists()
    left = [p.name for p in out.iterdir() if p.name.startswith(".") and p != temps["live"]]
    assert left == []
    mode = (out / "in_pred.png").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


# ------------------------------------------------------------------ issue 20, item 5: a run's files
def _solid(path: Path, rgb) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.zeros((24, 20, 3), np.uint8)
    img[:] = rgb
    cv2.imwrite(str(path), img[:, :, ::-1])
    return path


RED, GREEN, BLUE = (250, 10, 10), (10, 250, 10), (10, 10, 250)  # tiny_onnx classes 0, 1, 2


def _onnx_run(demo, model, inputs, out, *extra) -> int:
    argv = ["--onnx", str(model), "--input", *map(str, inputs), "--output", str(out)]
    return demo.main(argv + ["--no-progress", *extra])


def _classes_of(out: Path, stem: str) -> set:
    return set(np.unique(cv2.imread(str(out / f"{stem}_pred.png"), cv2.IMREAD_UNCHANGED)))


def test_output_names_are_unique_and_never_another_inputs_stem(demo, tmp_path):
    import json

    model = tiny_onnx(tmp_path / "tiny.onnx")
    ins = [_solid(tmp_path / "a" / "x.png", RED), _solid(tmp_path / "b" / "x.png", GREEN)]
    ins.append(_solid(tmp_path / "c" / "x_1.png", BLUE))
    out = tmp_path / "out"
    assert _onnx_run(demo, model, ins, out) == 0
    # each input's outputs hold its own prediction: nothing was written over
    assert [_classes_of(out, s) for s in ("x", "x_2", "x_1")] == [{0}, {1}, {2}]
    man = json.loads((out / "run_manifest.json").read_text())
    outputs = [set(r["outputs"]) for r in man["inputs"]]
    assert all(not (a & b) for i, a in enumerate(outputs) for b in outputs[i + 1 :])


def test_skip_existing_reuses_only_outputs_of_the_same_model(demo, tmp_path):
    import json
    import shutil

    model = tiny_onnx(tmp_path / "tiny.onnx")
    other = tiny_onnx(tmp_path / "other.onnx", k=2)  # another model: 2 classes
    img = [_solid(tmp_path / "in" / "x.png", BLUE)]
    out = tmp_path / "out"
    assert _onnx_run(demo, model, img, out) == 0
    assert _onnx_run(demo, model, img, out, "--skip-existing") == 0
    man = json.loads((out / "run_manifest.json").read_text())
    assert [r["status"] for r in man["inputs"]] == ["skipped"]
    # other weights: predicted again, and the manifest names the model that made the outputs
    assert _onnx_run(demo, other, img, out, "--skip-existing") == 0
    man = json.loads((out / "run_manifest.json").read_text())
    assert [r["status"] for r in man["inputs"]] == ["done"] and man["model_file"] == str(other)
    assert _classes_of(out, "x") <= {0, 1}
    # the same file changed in place (new export over the old one) is another model too
    shutil.copy(model, other)
    assert _onnx_run(demo, other, img, out, "--skip-existing") == 0
    man = json.loads((out / "run_manifest.json").read_text())
    assert [r["status"] for r in man["inputs"]] == ["done"] and _classes_of(out, "x") == {2}


def test_output_folder_equal_to_input_folder_never_takes_its_own_outputs(demo, tmp_path):
    import json

    model = tiny_onnx(tmp_path / "tiny.onnx")
    folder = tmp_path / "photos"
    _solid(folder / "x.png", RED)
    _solid(folder / "y.png", GREEN)
    for _ in range(2):
        assert _onnx_run(demo, model, [folder], folder) == 0
        man = json.loads((folder / "run_manifest.json").read_text())
        assert [Path(r["input"]).name for r in man["inputs"]] == ["x.png", "y.png"]
    assert sorted(p.name for p in folder.iterdir() if p.suffix == ".png") == sorted(
        ["legend.png", "x.png", "y.png"]
        + [f"{s}_{k}.png" for s in "xy" for k in ("pred", "color", "overlay")]
    )


# ------------------------------------------------------------------ issue 20, item 7: disk full
def _enospc(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


def _gdal_full(*args, **kwargs):
    from rasterio._err import CPLE_FileIOError

    raise CPLE_FileIOError(3, 28, "Failed to write: No space left on device")


# (id, what runs out of space, how it fails)
DISK_FULL = [
    ("png", "segclip_d2.geo.outputs.staged_png", _enospc),
    ("cog", "segclip_d2.raster.writers.to_cog", _enospc),
    ("gdal-error", "segclip_d2.raster.writers.to_cog", _gdal_full),
]


@pytest.mark.parametrize("case,target,fail", DISK_FULL, ids=[c[0] for c in DISK_FULL])
def test_disk_full_fails_that_input_and_the_run_goes_on(
    demo, tmp_path, monkeypatch, write_geotiff, case, target, fail
):
    import importlib
    import json

    model = tiny_onnx(tmp_path / "tiny.onnx")
    first = tmp_path / "in" / "a.tif"
    first.parent.mkdir()
    write_geotiff(first, height=40, width=36)
    second = _solid(tmp_path / "in" / "b.png", RED)
    module, name = target.rsplit(".", 1)
    real = getattr(importlib.import_module(module), name)
    calls = []

    def full_once(*args, **kwargs):  # the disk is full while the first input is written
        calls.append(1)
        return fail() if len(calls) == 1 else real(*args, **kwargs)

    monkeypatch.setattr(f"{module}.{name}", full_once)
    out = tmp_path / "out"
    assert _onnx_run(demo, model, [first, second], out) == 1
    man = json.loads((out / "run_manifest.json").read_text())
    assert [r["status"] for r in man["inputs"]] == ["failed", "done"]
    assert "No space left" in man["inputs"][0]["error"] and man["complete"]
    assert (out / "b_pred.png").is_file()
    assert not list(out.glob("a_pred.*")) and not [p for p in out.iterdir() if p.name[0] == "."]


# (id, the run file's writer, its name, whether the input is predicted before it)
RUN_FILES = [
    ("legend", "segclip_d2.raster.writers.write_png", "legend.png", False),
    ("manifest", "segclip_d2.geo.batch.write_manifest", "run_manifest.json", True),
]


@pytest.mark.parametrize("case,target,name,predicted", RUN_FILES, ids=[c[0] for c in RUN_FILES])
def test_run_file_that_cannot_be_written_is_one_line(
    demo, tmp_path, monkeypatch, capsys, case, target, name, predicted
):
    monkeypatch.setattr(target, _enospc)
    model = tiny_onnx(tmp_path / "tiny.onnx")
    out = tmp_path / "out"
    assert _onnx_run(demo, model, [_solid(tmp_path / "x.png", RED)], out) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and name in lines[0] and "No space left" in lines[0], err
    assert "Traceback" not in err and (out / "x_pred.png").is_file() == predicted
    assert not (out / name).exists()


# ------------------------------------------------------------------ issue 20, item 8: class names
def test_cut_prompt_is_warned(demo, tiny_config, tmp_path, caplog):
    long = " ".join(["very"] * 80) + " long river"
    argv = ["--config-file", str(tiny_config(tmp_path, "text")), "--input", _png(tmp_path)]
    argv += ["--output", str(tmp_path / "out"), "--no-progress", "--allow-random-weights"]
    with caplog.at_level("WARNING"):
        assert demo.main(argv + ["--classes", f"road,{long}"]) == 0
    cut = [r.getMessage() for r in caplog.records if "cut to CLIP" in r.getMessage()]
    assert len(cut) == 1 and "long river" in cut[0]


def test_legend_draws_names_its_font_covers_and_falls_back_to_ids(caplog):
    from segclip_d2.data import visualize

    colors = [(200, 0, 0), (0, 200, 0)]
    latin = visualize.draw_legend(["road", "Straße"], colors)
    cyrillic = visualize.draw_legend(["road", "лес"], colors)
    assert latin.shape[1] > 60 and not np.array_equal(latin, cyrillic)
    with caplog.at_level("WARNING"):
        unknown = visualize.draw_legend(["road", "\ue000\ue001"], colors)  # private use: no font
    assert "class ids only" in caplog.text
    ids_only = visualize.draw_legend(["0", "1"], colors)  # what the fallback draws
    assert unknown.shape == ids_only.shape
    if visualize.legend_font("лес") is None:
        pytest.skip("no font on this machine covers Cyrillic")
    assert visualize.legend_font("лес") and visualize._font_covers(
        visualize.legend_font("лес"), "лес"
    )
