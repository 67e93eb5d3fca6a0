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
from script_helpers import assert_one_error_line

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
    (
        "flag-after-overrides",
        lambda t: C + ["SOLVER.MAX_ITER", "2", "--resume"],
        ["--resume comes after the KEY VALUE overrides", "put the flags before the overrides"],
    ),
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
    assert_one_error_line(err, texts)
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


# ---------------------------------------------------------------------- met during training
# Each case trains the tiny model in-process (tiny_training in conftest.py) and checks: exit 2,
# one line with the texts, no traceback, and what is left on disk.


def _checkpoints(out: Path) -> dict[str, dict]:
    """Every checkpoint of ``out``, loaded (a corrupt or half-written one fails the test)."""
    return {p.name: torch.load(p, map_location="cpu", weights_only=True) for p in out.glob("*.pth")}


def _all_finite(ckpt: dict) -> bool:
    return all(
        bool(torch.isfinite(v).all())
        for v in ckpt["model"].values()
        if torch.is_tensor(v) and v.is_floating_point()
    )


def _no_temps(out: Path) -> bool:
    return not [p.name for p in out.iterdir() if ".tmp" in p.name]


def _diverge(t, mp):
    """A learning rate of 100 without clipping: inf gradients at the second iteration, with a
    checkpoint and an evaluation (model_best.pth) after every iteration."""
    opts = ["SOLVER.BASE_LR", "100.0", "SOLVER.CLIP_GRADIENTS.ENABLED", "False"]
    return opts + ["DATASETS.TEST", "('synthetic_aerial_val',)", "TEST.EVAL_PERIOD", "1"]


def _check_diverged(out: Path):
    ckpts = _checkpoints(out)
    assert "model_best.pth" in ckpts and "model_final.pth" not in ckpts, sorted(ckpts)
    assert all(_all_finite(c) for c in ckpts.values()), "a checkpoint holds NaN/inf weights"
    tagged = (out / "last_checkpoint").read_text().strip()
    assert tagged in ckpts


def _disk_full_after(n: int, error: Exception):
    """torch.save fails on its ``n``-th call after writing part of the file (a full disk)."""

    def setup(t, mp):
        real, calls = torch.save, []

        def save(obj, f, *a, **k):
            calls.append(f)
            if len(calls) < n:
                return real(obj, f, *a, **k)
            Path(f).write_bytes(b"PK\x03\x04 partial")
            raise error

        mp.setattr(torch, "save", save)
        if isinstance(error, RuntimeError):  # torch's zip writer: the free space tells
            import shutil

            from segclip_d2.engine import checkpointer

            usage = shutil.disk_usage("/")._replace(free=1000)
            mp.setattr(checkpointer.shutil, "disk_usage", lambda p: usage)
        return []

    return setup


def _check_disk_full(out: Path):
    ckpts = _checkpoints(out)
    assert sorted(ckpts) == ["model_0000000.pth", "model_0000001.pth"], sorted(ckpts)
    assert (out / "last_checkpoint").read_text().strip() == "model_0000001.pth"
    assert _no_temps(out)


def _own_dataset(labels_fn):
    """Register a 4-tile dataset in tmp whose labels ``labels_fn(i, path)`` writes; trains on it
    with a data worker process (the error crosses the worker boundary)."""

    def setup(t, mp):
        import numpy as np
        from detectron2.data import DatasetCatalog, MetadataCatalog
        from PIL import Image

        name = f"trainerr_{t.name}"
        folder = t / "own"
        folder.mkdir()
        records = []
        for i in range(4):
            img, lbl = folder / f"img{i}.png", folder / f"lbl{i}.png"
            Image.fromarray(np.full((64, 64, 3), 40 * i, np.uint8)).save(img)
            labels_fn(i, lbl)
            records.append({"file_name": str(img), "sem_seg_file_name": str(lbl)})
            records[-1].update(height=64, width=64, image_id=i)
        meta = MetadataCatalog.get("synthetic_aerial_train").as_dict()
        meta.pop("name")
        DatasetCatalog.register(name, lambda: [dict(r) for r in records])
        MetadataCatalog.get(name).set(**meta)
        mp.setattr(sys.modules[__name__], "_registered", [*_registered, name])
        return ["DATASETS.TRAIN", f"('{name}',)", "DATALOADER.NUM_WORKERS", "1"]

    return setup


_registered: list[str] = []


def _label(value_of):
    import numpy as np
    from PIL import Image

    def write(i, path):
        value = value_of(i)
        if value is None:  # a label cut short by a failed copy
            Image.fromarray(np.full((64, 64), 1, np.uint8)).save(path)
            path.write_bytes(path.read_bytes()[:40])
        else:
            Image.fromarray(np.full((64, 64), value, np.uint8)).save(path)

    return write


def _check_checkpoints_intact(out: Path):
    ckpts = _checkpoints(out)
    if (out / "last_checkpoint").exists():
        assert (out / "last_checkpoint").read_text().strip() in ckpts
    assert "model_final.pth" not in ckpts and _no_temps(out)


def _nothing_written(out: Path):
    assert not out.exists()


def _earlier_run(t, mp):
    out = t / "out"
    out.mkdir()
    for name in ("model_final.pth", "model_best.pth", "last_checkpoint"):
        (out / name).write_text(f"earlier {name}")
    return []


def _earlier_run_kept(out: Path):
    for name in ("model_final.pth", "model_best.pth", "last_checkpoint"):
        assert (out / name).read_text() == f"earlier {name}"
    assert sorted(p.name for p in out.iterdir()) == [
        "last_checkpoint",
        "model_best.pth",
        "model_final.pth",
    ]


ENOSPC = OSError(28, "No space left on device")
TORCH_FULL = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
# (id, setup(tmp, monkeypatch) -> extra overrides, texts of the one line, check(out))
TRAIN_CASES = [
    (
        "diverged",
        _diverge,
        ["training diverged at iteration 2", "SOLVER.BASE_LR", "SOLVER.CLIP_GRADIENTS"],
        _check_diverged,
    ),
    (
        "disk-full",
        _disk_full_after(3, ENOSPC),
        ["model_0000002.pth", "could not be written: no space left on device", "--resume"],
        _check_disk_full,
    ),
    (
        "disk-full-torch-writer",
        _disk_full_after(3, TORCH_FULL),
        ["model_0000002.pth", "no space left on device (0 MB free"],
        _check_disk_full,
    ),
    (
        "corrupt-label",
        _own_dataset(_label(lambda i: None if i == 2 else i)),
        ["training data", "lbl2.png", "cannot read label", "re-prepare"],
        _check_checkpoints_intact,
    ),
    (
        "all-ignore-labels",
        _own_dataset(_label(lambda i: 255)),
        ["DATASETS.TRAIN", "all 4 labels hold only the ignore value 255"],
        _nothing_written,
    ),
    (
        "earlier-run-without-resume",
        _earlier_run,
        ["OUTPUT_DIR", "holds an earlier training", "--resume", "fresh OUTPUT_DIR"],
        _earlier_run_kept,
    ),
]


@pytest.mark.parametrize("case,setup,texts,check", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_training_failure_is_one_line_and_keeps_what_was_written(
    tiny_training, tmp_path, monkeypatch, capsys, case, setup, texts, check
):
    from detectron2.data import DatasetCatalog

    import train_net

    argv, out = tiny_training
    extra = setup(tmp_path, monkeypatch)
    argv = argv + ["SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "1"] + extra
    try:
        assert run_main(train_net.cli, argv) == 2
    finally:
        for name in _registered:
            DatasetCatalog.remove(name)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    for text in texts:
        assert text in lines[0], (text, lines[0])
    assert "Traceback" not in err
    check(out)
