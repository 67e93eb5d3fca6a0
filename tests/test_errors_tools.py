"""tools/*.py under the error contract; the evaluator scores the demo's predictions (255 = no
prediction, counted wrong and reported; unknown files listed once)."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from script_helpers import load_script

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tools():
    return {
        "evaluate": load_script("tools/evaluate_predictions.py"),
        "bench": load_script("tools/benchmark_inference.py"),
        "latency": load_script("tools/benchmark_latency.py"),
        "targets": load_script("tools/benchmark_targets.py"),
        "geotiff": load_script("tools/benchmark_geotiff.py"),
        "case": load_script("tools/bench_case.py"),
        "card": load_script("tools/model_card.py"),
        "msda": load_script("tools/benchmark_msda.py"),
    }


@pytest.fixture(scope="module")
def loveda_val(tmp_path_factory):
    """A prepared two-image loveda_val and its train-id labels by stem."""
    tmp = tmp_path_factory.mktemp("lv")
    prep = load_script("datasets/prepare_loveda.py")
    rng = np.random.default_rng(0)
    labels = {}
    for domain, name in (("Urban", "3514"), ("Rural", "2522")):
        raw = rng.integers(1, 8, (12, 10)).astype(np.uint8)  # no ignore pixels
        for sub, arr in (
            ("images_png", rng.integers(0, 256, (12, 10, 3), np.uint8)),
            ("masks_png", raw),
        ):
            p = tmp / "raw" / "Val" / domain / sub / f"{name}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(p)
        labels[f"{domain.lower()}_{name}"] = raw - 1
    assert prep.main(["--src", str(tmp / "raw"), "--dst", str(tmp / "ds")]) == 0
    return tmp / "ds", labels


def _run(tool, argv, capsys):
    rc = tool.main(argv)
    return rc, capsys.readouterr()


def test_evaluator_scores_demo_predictions_with_no_prediction_pixels(
    tools, loveda_val, tmp_path, monkeypatch, capsys, caplog
):
    root, labels = loveda_val
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    preds = tmp_path / "demo_out"
    preds.mkdir()
    missed = 0
    for stem, gt in labels.items():
        pred = gt.astype(np.uint8).copy()  # perfect, except a no-data strip
        pred[:3] = 255
        missed += pred[:3].size
        Image.fromarray(pred).save(preds / f"{stem}_pred.png")  # the demo's names
        Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(preds / f"{stem}_color.png")
    (preds / "legend.png").write_bytes(b"x")
    (preds / "notes.txt").write_text("?")
    (preds / "other_0001.png").write_bytes(b"x")
    out = tmp_path / "m.json"
    with caplog.at_level(logging.WARNING):
        rc, cap = _run(
            tools["evaluate"],
            ["--dataset", "loveda_val", "--pred-dir", str(preds), "--output", str(out)],
            capsys,
        )
    assert rc == 0, cap.err
    data = json.loads(out.read_text())
    assert data["no_prediction_pixels"] == missed
    assert data["OA"] == pytest.approx(100.0 * (1 - missed / 240))  # missed pixels are wrong
    assert data["mIoU"] < 100.0
    warnings = [r.getMessage() for r in caplog.records if "belong to no image" in r.getMessage()]
    assert len(warnings) == 1 and "notes.txt" in warnings[0] and "other_0001.png" in warnings[0]
    assert "legend.png" not in warnings[0] and "_color.png" not in warnings[0]
    assert any("no prediction (255)" in r.getMessage() for r in caplog.records)


def _ds(t):
    return ["--pred-dir", str(t)]


# (id, tool, argv given tmp, texts the one-line message must contain)
CASES = [
    (
        "evaluate-unknown-dataset",
        "evaluate",
        lambda t: ["--dataset", "lovda_val"] + _ds(t),
        ["--dataset", "'lovda_val'", "closest first: loveda_val"],
    ),
    (
        "evaluate-missing-pred-dir",
        "evaluate",
        lambda t: ["--dataset", "loveda_val", "--pred-dir", str(t / "nope")],
        ["--pred-dir", "nope", "not found"],
    ),
    (
        "evaluate-missing-prediction",
        "evaluate",
        lambda t: ["--dataset", "loveda_val"] + _ds(t),
        ["rural_2522.png", "missing"],
    ),
    (
        "evaluate-bad-values",
        "evaluate",
        lambda t: ["--dataset", "loveda_val"] + _ds(_bad_preds(t)),
        ["rural_2522.png", "[9]", "255 = no prediction"],
    ),
    ("evaluate-bad-flag", "evaluate", lambda t: ["--dataset"], ["command line", "--dataset"]),
    (
        "bench-random-refused",
        "bench",
        lambda t: ["--ab"],
        ["MODEL.WEIGHTS", "--allow-random-weights"],
    ),
    (
        "bench-weights-missing",
        "latency",
        lambda t: ["--opts", "MODEL.WEIGHTS", str(t / "gone.pth")],
        ["MODEL.WEIGHTS", "gone.pth", "no such file"],
    ),
    ("bench-onnx-gone", "bench", lambda t: ["--onnx", "m.onnx"], ["command line", "--onnx"]),
    ("targets-random-refused", "targets", lambda t: [], ["MODEL.WEIGHTS", "--allow-random"]),
    ("geotiff-odd-opts", "geotiff", lambda t: ["--opts", "TEST.MODE"], ["--opts", "each KEY"]),
    ("case-unknown", "case", lambda t: ["fly", "--config", "x.yaml"], ["command line", "fly"]),
    (
        "case-config-missing",
        "case",
        lambda t: ["forward", "--config", str(t / "nope.yaml")],
        ["nope.yaml", "no such config file"],
    ),
    ("card-missing", "card", lambda t: [str(t / "gone.pth")], ["gone.pth", "no such"]),
    (
        "card-no-card",
        "card",
        lambda t: [_plain_checkpoint(t)],
        ["plain.pth", "has no model card"],
    ),
    ("msda-bad-flag", "msda", lambda t: ["--repeats", "x"], ["command line", "--repeats"]),
    ("msda-bad-value", "msda", lambda t: ["--repeats", "0"], ["--repeats", ">= 1"]),
]


def _plain_checkpoint(t: Path) -> str:
    import torch

    torch.save({"model": {"w": torch.zeros(1)}}, t / "plain.pth")
    return str(t / "plain.pth")


def _bad_preds(t: Path) -> Path:
    for stem in ("urban_3514", "rural_2522"):
        Image.fromarray(np.full((12, 10), 9 if stem.startswith("rural") else 0, np.uint8)).save(
            t / f"{stem}.png"
        )
    return t


@pytest.mark.parametrize("case,tool,argv,texts", CASES, ids=[c[0] for c in CASES])
def test_user_error_is_one_line_exit_2(
    tools, loveda_val, tmp_path, monkeypatch, capsys, case, tool, argv, texts
):
    from segclip_d2.errors import run_main

    monkeypatch.setenv("DETECTRON2_DATASETS", str(loveda_val[0]))
    if case == "evaluate-missing-prediction":
        Image.fromarray(np.zeros((12, 10), np.uint8)).save(tmp_path / "urban_3514.png")
    mod = tools[tool]
    rc = run_main(mod.main, argv(tmp_path)) if tool == "msda" else mod.main(argv(tmp_path))
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    for text in texts:
        assert text in lines[0], (text, lines[0])
    assert "Traceback" not in err
