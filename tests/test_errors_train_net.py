"""train_net.py's error contract, one table row per bad command line / config / file.

Each case runs ``train_net.cli(argv)`` in-process under ``run_main`` and checks: exit code 2,
one line ``error: <where>: ...`` naming the file or key, no traceback, and nothing written to
OUTPUT_DIR. A few end-to-end cases run the script (traceback only with --debug; a user error in
launched worker processes printed once).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segclip_d2.errors import run_main

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # train_net.py lives at the repo root
CONFIG = str(REPO / "configs" / "synthetic" / "segclip_cpu.yaml")


def _typo_yaml(tmp: Path) -> str:
    path = tmp / "typo.yaml"
    path.write_text(f"_BASE_: {CONFIG}\nSOLVER:\n  BASE_LRR: 0.01\n")
    return str(path)


def _bad_yaml(tmp: Path) -> str:
    path = tmp / "broken.yaml"
    path.write_text("SOLVER:\n  BASE_LR: [0.1\n")
    return str(path)


def _missing_base(tmp: Path) -> str:
    path = tmp / "child.yaml"
    path.write_text("_BASE_: nowhere.yaml\n")
    return str(path)


def _file(tmp: Path) -> str:
    (tmp / "a_file").write_text("x")
    return str(tmp / "a_file")


def _corrupt_weights(tmp: Path) -> str:
    (tmp / "model_final.pth").write_bytes(b"PK\x03\x04 truncated by a kill")
    return str(tmp / "model_final.pth")


def _corrupt_pickle(tmp: Path) -> str:
    """Weights that only a full load finds corrupt (a cut pickle: no cheap pre-check)."""
    (tmp / "R-50.pkl").write_bytes(b"\x80\x04\x95 cut")
    return str(tmp / "R-50.pkl")


C = ["--config-file", CONFIG]
# (id, argv given tmp -> list, texts the one-line message must contain)
CASES = [
    ("no-config", lambda t: [], ["--config-file: missing"]),
    ("missing-config", lambda t: ["--config-file", str(t / "nope.yaml")], ["nope.yaml", "no such"]),
    ("yaml-syntax", lambda t: ["--config-file", _bad_yaml(t)], ["broken.yaml", "not valid YAML"]),
    ("missing-base", lambda t: ["--config-file", _missing_base(t)], ["child.yaml", "nowhere.yaml"]),
    (
        "typo-in-yaml",
        lambda t: ["--config-file", _typo_yaml(t)],
        ["typo.yaml", "SOLVER.BASE_LRR", "did you mean SOLVER.BASE_LR?"],
    ),
    (
        "typo-override",
        lambda t: C + ["MODEL.SEGCLIP.HIDEN_DIM", "8"],
        ["MODEL.SEGCLIP.HIDEN_DIM", "did you mean MODEL.SEGCLIP.HIDDEN_DIM?"],
    ),
    ("odd-overrides", lambda t: C + ["SOLVER.MAX_ITER"], ["SOLVER.MAX_ITER", "each KEY needs"]),
    ("bad-value", lambda t: C + ["SOLVER.IMS_PER_BATCH", "many"], ["SOLVER.IMS_PER_BATCH"]),
    ("bad-flag", lambda t: C + ["--precision", "int8"], ["command line", "--precision"]),
    (
        "unknown-dataset",
        lambda t: C + ["DATASETS.TEST", "('lovda_val',)"],
        ["DATASETS.TEST", "'lovda_val'", "closest first: loveda_val,"],
    ),
    (
        "dataset-not-prepared",
        lambda t: C + ["DATASETS.TEST", "('loveda_val',)"],
        ["DATASETS.TEST", "loveda_val", "prepare_loveda.py"],
    ),
    ("batch-zero", lambda t: C + ["SOLVER.IMS_PER_BATCH", "0"], ["SOLVER.IMS_PER_BATCH", "> 0"]),
    (
        "batch-vs-world",
        lambda t: C + ["--num-gpus", "2", "SOLVER.IMS_PER_BATCH", "3"],
        ["SOLVER.IMS_PER_BATCH", "over 2 processes", "multiple of 2"],
    ),
    (
        "weights-missing",
        lambda t: C + ["MODEL.WEIGHTS", str(t / "gone.pth")],
        ["MODEL.WEIGHTS", "gone.pth", "no such file"],
    ),
    (
        "eval-random",
        lambda t: C + ["--eval-only"],
        ["MODEL.WEIGHTS", "randomly initialised", "--allow-random-weights"],
    ),
    (
        "eval-random-weights-empty",
        lambda t: C + ["--eval-only", "MODEL.WEIGHTS", ""],
        ["MODEL.WEIGHTS", "--allow-random-weights"],
    ),
    ("output-is-a-file", lambda t: C + ["OUTPUT_DIR", _file(t)], ["OUTPUT_DIR", "not a folder"]),
]


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """An empty dataset root (nothing prepared) and OUTPUT_DIR under tmp_path."""
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    return tmp_path


@pytest.mark.parametrize("case,argv,texts", CASES, ids=[c[0] for c in CASES])
def test_user_error_is_one_line_exit_2_and_writes_nothing(isolated, capsys, case, argv, texts):
    import train_net

    out = isolated / "out"
    args = argv(isolated)
    if "OUTPUT_DIR" not in args and len(args) >= 2:
        args = args + ["OUTPUT_DIR", str(out)]
    assert run_main(train_net.cli, args) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    for text in texts:
        assert text in lines[0], (text, lines[0])
    assert "Traceback" not in err
    assert not out.exists(), "nothing may be written before the checks pass"
    assert not (isolated / "datasets").exists()


def _subprocess(argv, env_extra=None, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", **(env_extra or {}))
    return subprocess.run(
        [sys.executable, str(REPO / "train_net.py"), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=REPO,
    )


def test_script_one_line_and_traceback_only_with_debug(tmp_path, capsys):
    """The script itself (one subprocess): one line, exit 2; --debug adds the traceback."""
    import train_net

    argv = C + ["SOLVER.IMS_PER_BATCH", "0", "OUTPUT_DIR", str(tmp_path / "o")]
    plain = _subprocess(argv)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines()[-1].startswith("error: SOLVER.IMS_PER_BATCH:")
    assert run_main(train_net.cli, C + ["--debug"] + argv[2:]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: SOLVER")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_worker_user_error_printed_once_under_two_processes(tmp_path):
    """A corrupt MODEL.WEIGHTS is found when the workers load it: rank 0 prints the one line,
    the launcher exits 2, no traceback, no empty metrics.json."""
    weights = _corrupt_pickle(tmp_path)
    argv = C + ["--num-gpus", "2", "MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(tmp_path / "o")]
    argv += ["SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0"]
    env = {
        "DETECTRON2_DATASETS": str(tmp_path / "ds"),
        "SEGCLIP_SYNTHETIC_NUM_TRAIN": "2",
        "SEGCLIP_SYNTHETIC_NUM_VAL": "1",
        "SEGCLIP_SYNTHETIC_SIZE": "64",
    }
    proc = _subprocess(argv, env, timeout=600)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and weights in lines[0] and "truncated or corrupt" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_eval_only_corrupt_weights_named_and_allow_random_runs(tmp_path, monkeypatch, capsys):
    """--eval-only with a corrupt checkpoint: one line naming it (after the model is built,
    nothing evaluated). --allow-random-weights lets a random model through."""
    import train_net

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "ds"))
    for k, v in (("NUM_TRAIN", "2"), ("NUM_VAL", "1"), ("SIZE", "64")):
        monkeypatch.setenv(f"SEGCLIP_SYNTHETIC_{k}", v)
    tiny = ["MODEL.SEGCLIP.HIDDEN_DIM", "32", "MODEL.SEGCLIP.DEC_LAYERS", "1"]
    tiny += ["MODEL.SEGCLIP.MASK_DIM", "32", "MODEL.SEGCLIP.PIXEL_DECODER.CONVS_DIM", "32"]
    tiny += ["MODEL.SEGCLIP.PIXEL_DECODER.ENC_LAYERS", "1", "MODEL.SEGCLIP.NUM_QUERIES", "8"]
    weights = _corrupt_weights(tmp_path)
    out = tmp_path / "o"
    argv = C + ["--eval-only", "MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(out)] + tiny
    torch.set_num_threads(1)
    assert run_main(train_net.cli, argv) == 2
    err = capsys.readouterr().err
    assert f"error: {weights}: cannot be read as a checkpoint" in err
    assert "weights_only" not in err and "Traceback" not in err
    assert not (out / "inference").exists() and not (out / "predictions").exists()
    argv = C + ["--eval-only", "--allow-random-weights", "OUTPUT_DIR", str(out)] + tiny
    assert run_main(train_net.cli, argv) == 0
    assert (out / "predictions").is_dir()


def test_under_torchrun_only_rank_0_reports(tmp_path, monkeypatch, capsys):
    import train_net

    argv = C + ["SOLVER.IMS_PER_BATCH", "0", "OUTPUT_DIR", str(tmp_path / "o")]
    for rank, printed in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert run_main(train_net.cli, argv) == 2
        assert ("error: SOLVER.IMS_PER_BATCH" in capsys.readouterr().err) is printed
