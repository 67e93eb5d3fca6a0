"""Nothing a user opens runs code: payload files through every entry point and tool that opens
such files (issue 20, item 1).

Each payload would create a marker file when run: a checkpoint whose pickle calls os.system, a
``.pkl`` with the same, a YAML config with ``!!python/object/apply:os.system``, a model card
(in a checkpoint and in ONNX metadata) whose config holds that tag. Every row asserts exit code
2, one ``error:`` line naming the file, no traceback, and the marker still absent. Entry points
run in-process through their ``main(argv)`` (one real subprocess: training with the payload as
MODEL.WEIGHTS).
"""

import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from segclip_d2.errors import run_main

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "synthetic" / "segclip_cpu.yaml")
# A smaller model: the payload cases fail before or right after the build.
TINY = ["MODEL.SEGCLIP.HIDDEN_DIM", "32", "MODEL.SEGCLIP.DEC_LAYERS", "1",
        "MODEL.SEGCLIP.MASK_DIM", "32", "MODEL.SEGCLIP.PIXEL_DECODER.CONVS_DIM", "32",
        "MODEL.SEGCLIP.PIXEL_DECODER.ENC_LAYERS", "1",
        "MODEL.SEGCLIP.NUM_QUERIES", "8"]  # fmt: skip


class _Payload:
    """Unpickling this runs ``touch marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _tagged_yaml(marker) -> str:
    return f"MODEL:\n  WEIGHTS: !!python/object/apply:os.system ['touch {marker}']\n"


def _make_payloads(tmp: Path, marker: Path) -> dict:
    files = {}
    files["pth"] = tmp / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": _Payload(marker)}, files["pth"])
    files["pkl"] = tmp / "evil.pkl"
    files["pkl"].write_bytes(
        pickle.dumps({"model": {"w": np.zeros(2)}, "__author__": "x", "p": _Payload(marker)})
    )
    files["yaml"] = tmp / "evil.yaml"
    files["yaml"].write_text(f"_BASE_: {CONFIG}\n" + _tagged_yaml(marker))
    card = {"format": "segclip-model-card/1", "class_names": ["a"], "config": _tagged_yaml(marker)}
    files["card_pth"] = tmp / "evil_card.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "model_card": card}, files["card_pth"])
    files["nan"] = tmp / "diverged.pth"  # not a payload: non-finite weights, refused the same way
    torch.save({"model": {"w": torch.tensor([1.0, float("nan")])}}, files["nan"])
    files["onnx"] = tmp / "evil.onnx"
    _tiny_onnx(files["onnx"], {"segclip_model_card": json.dumps(card)})
    return files


def _tiny_onnx(path: Path, metadata: dict) -> None:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for k, v in metadata.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))


def _load_script(rel: str):
    spec = importlib.util.spec_from_file_location(Path(rel).stem + "_trust", REPO / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _fresh_loggers():
    """train_net.py's logging setup (cached by detectron2) keeps the stream of the test that
    first ran it; drop it after every test so the next one logs to its own capture."""
    yield
    import logging

    from detectron2.utils.logger import setup_logger

    setup_logger.cache_clear()
    for name in ("segclip_d2", "detectron2", "fvcore", "d2"):
        logging.getLogger(name).handlers.clear()


@pytest.fixture(scope="module")
def payloads(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("payloads")
    marker = tmp / "MARKER"
    return tmp, marker, _make_payloads(tmp, marker)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "tile.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(path)
    return str(path)


def _train_net(argv):
    sys.path.insert(0, str(REPO))
    import train_net

    return run_main(train_net.cli, argv)


def _script(rel):
    return lambda argv: run_main(_load_script(rel).main, argv)


def _loader(argv):
    from segclip_d2.predict.load import load_model

    return run_main(lambda a: load_model(a[0], a[1] or None, opts=TINY) and 0, argv)


def _eval(key):
    return lambda f, o, i: EVAL + ["MODEL.WEIGHTS", f[key], "OUTPUT_DIR", o] + TINY


def _demo(key=None):
    if key is None:  # the payload config
        return lambda f, o, i: ["--config-file", f["yaml"], "--input", i, "--output", o]
    return lambda f, o, i: _demo_args(i, o) + ["--opts", "MODEL.WEIGHTS", f[key], *TINY]


def _export(config, key):
    return lambda f, o, i: ["--config-file", f.get(config, config), "--weights", f[key],
                            "--output", f"{o}.onnx"]  # fmt: skip


EVAL = ["--eval-only", "--config-file", CONFIG]


def _demo_args(i, o):
    return ["--config-file", CONFIG, "--input", i, "--output", o]


CARD, DEMO_PY, EXPORT = "tools/model_card.py", "demo/demo.py", "tools/export_onnx.py"
# (id, entry point, argv given (files, out folder, image), payload key whose file is named)
# fmt: off
CASES = [
    ("train_net-eval-pth", _train_net, _eval("pth"), "pth"),
    ("train_net-eval-pkl", _train_net, _eval("pkl"), "pkl"),
    ("train_net-yaml", _train_net, lambda f, o, i: ["--config-file", f["yaml"], "OUTPUT_DIR", o],
     "yaml"),
    ("demo-pth", _script(DEMO_PY), _demo("pth"), "pth"),
    ("demo-pkl", _script(DEMO_PY), _demo("pkl"), "pkl"),
    ("demo-yaml", _script(DEMO_PY), _demo(), "yaml"),
    ("model_card-pth", _script(CARD), lambda f, o, i: [f["pth"]], "pth"),
    ("model_card-pkl", _script(CARD), lambda f, o, i: [f["pkl"]], "pkl"),
    ("model_card-card", _script(CARD), lambda f, o, i: [f["card_pth"]], "card_pth"),
    ("model_card-onnx", _script(CARD), lambda f, o, i: [f["onnx"]], "onnx"),
    ("export-pth", _script(EXPORT), _export(CONFIG, "pth"), "pth"),
    ("export-pkl", _script(EXPORT), _export(CONFIG, "pkl"), "pkl"),
    ("export-yaml", _script(EXPORT), _export("yaml", "card_pth"), "yaml"),
    ("export-card", _script(EXPORT), _export(CONFIG, "card_pth"), "card_pth"),
    ("bench_ab-pth", _script("tools/benchmark_inference.py"),
     lambda f, o, i: ["--ab", "--config", CONFIG, "--opts", "MODEL.WEIGHTS", f["pth"]], "pth"),
    ("bench_case-yaml", _script("tools/bench_case.py"),
     lambda f, o, i: ["forward", "--config", f["yaml"]], "yaml"),
    ("bench_seams-pkl", _script("tools/benchmark_seams.py"),
     lambda f, o, i: ["--image", i, "--opts", "MODEL.WEIGHTS", f["pkl"]], "pkl"),
    ("train_net-eval-nan", _train_net, _eval("nan"), "nan"),
    ("demo-nan", _script(DEMO_PY), _demo("nan"), "nan"),
    ("export-nan", _script(EXPORT), _export(CONFIG, "nan"), "nan"),
    ("loader-onnx-config", _loader, lambda f, o, i: [f["onnx"], ""], "onnx"),
    ("loader-card-config", _loader, lambda f, o, i: [None, f["card_pth"]], "card_pth"),
]
# fmt: on


@pytest.mark.parametrize("case,entry,argv,named", CASES, ids=[c[0] for c in CASES])
def test_payload_is_refused_without_running(
    payloads, image, tmp_path, monkeypatch, capsys, case, entry, argv, named
):
    tmp, marker, files = payloads
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    for k, v in (("NUM_TRAIN", "2"), ("NUM_VAL", "1"), ("SIZE", "64")):
        monkeypatch.setenv(f"SEGCLIP_SYNTHETIC_{k}", v)
    args = [str(a) if isinstance(a, Path) else a for a in argv(files, str(tmp_path / "o"), image)]
    rc = entry(args)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert rc == 2, err[-3000:]
    assert len(lines) == 1, err[-3000:]
    assert str(files[named]) in lines[0], lines[0]
    if named == "nan":  # refused for its values, not for not fitting the model
        assert "has non-finite weights" in lines[0], lines[0]
    assert "Traceback" not in err
    assert not marker.exists(), "the payload ran"


def test_training_refuses_a_payload_pkl_as_model_weights(payloads, tmp_path):
    """The real script (one subprocess): training's MODEL.WEIGHTS load goes through the same
    reader as inference (the detectron2 checkpointer's .pkl path included)."""
    _, marker, files = payloads
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1",
               DETECTRON2_DATASETS=str(tmp_path / "ds"), SEGCLIP_SYNTHETIC_NUM_TRAIN="2",
               SEGCLIP_SYNTHETIC_NUM_VAL="1", SEGCLIP_SYNTHETIC_SIZE="64")  # fmt: skip
    argv = ["--config-file", CONFIG, "MODEL.WEIGHTS", str(files["pkl"]), "OUTPUT_DIR",
            str(tmp_path / "o"), "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
            *TINY]  # fmt: skip
    proc = subprocess.run([sys.executable, str(REPO / "train_net.py"), *argv], env=env,
                          capture_output=True, text=True, timeout=600, cwd=REPO)  # fmt: skip
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and str(files["pkl"]) in lines[0] and "refused" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not marker.exists()
