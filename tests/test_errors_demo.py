"""demo/demo.py's error contract, one table row per case: exit code, one line naming the file or
key, no traceback, and what is (not) left in --output. Runs ``demo.main(argv)`` in-process."""

import os
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_demo import load_demo, write_config

from segclip_d2.utils.atomic import temp_name


@pytest.fixture(scope="module")
def demo():
    return load_demo()


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


def _base(t: Path, output=None, weights=True) -> list[str]:
    argv = ["--config-file", str(write_config(t)), "--input", _png(t), "--no-progress"]
    argv += ["--output", output or str(t / "out")]
    return argv + (["--allow-random-weights"] if weights else [])


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
]


@pytest.mark.parametrize("case,argv,texts", CASES, ids=[c[0] for c in CASES])
def test_user_error_is_one_line_exit_2(demo, tmp_path, capsys, case, argv, texts):
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
def test_unwritable_output(demo, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert demo.main(_base(tmp_path, output=str(locked / "out"))) == 2
    assert "--output" in capsys.readouterr().err and not (locked / "out").exists()


def test_truncated_jpeg_is_a_failed_input_and_dead_temps_go(demo, tmp_path, capsys):
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
        argv = ["--config-file", str(write_config(tmp_path)), "--input", good, str(cut)]
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
