"""datasets/prepare_uavid.py: colour labels, patches, full frames, submission layout."""

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from PIL import Image
from script_helpers import load_script

from segclip_d2.config import add_segclip_config
from segclip_d2.data.dataset_facts import get_facts
from segclip_d2.data.evaluator import build_evaluator
from segclip_d2.data.prepare_utils import PrepareError, patch_windows

REPO = Path(__file__).resolve().parents[1]
UAVID = get_facts("uavid")


prep = load_script("datasets/prepare_uavid.py")
H, W = 72, 136  # small stand-in for 2160 x 3840 frames


def _png(path: Path, arr: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _fake_release(root: Path) -> dict:
    rng = np.random.default_rng(0)
    pal = np.array(UAVID.colors, dtype=np.uint8)
    ids = {}
    for split, seqs in (("train", ["seq1", "seq2"]), ("val", ["seq16"]), ("test", ["seq21"])):
        for seq in seqs:
            for frame in ("000000", "000100"):
                base = root / f"uavid_{split}" / seq
                _png(base / "Images" / f"{frame}.png", rng.integers(0, 256, (H, W, 3), np.uint8))
                if split != "test":
                    lab = rng.integers(0, UAVID.num_classes, (H, W))
                    _png(base / "Labels" / f"{frame}.png", pal[lab])
                    ids[(split, seq, frame)] = lab
    return ids


def test_uavid_patches_full_frames_and_submission(tmp_path, monkeypatch):
    src, dst = tmp_path / "raw", tmp_path / "out"
    ids = _fake_release(src)
    assert (
        prep.main(["--src", str(src), "--dst", str(dst), "--patch-size", "64", "--stride", "64"])
        == 0
    )
    wins = patch_windows(H, W, 64, 64)
    assert len(wins) == 2 * 3
    for (split, seq, frame), lab in ids.items():
        for y0, x0 in wins:
            p = dst / "uavid" / split / "labels" / f"{seq}_{frame}_{y0:05d}_{x0:05d}.png"
            np.testing.assert_array_equal(
                np.asarray(Image.open(p)), lab[y0 : y0 + 64, x0 : x0 + 64]
            )
        if split == "val":
            full = np.asarray(Image.open(dst / "uavid/val_full/labels" / f"{seq}_{frame}.png"))
            np.testing.assert_array_equal(full, lab)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(dst))
    assert len(DatasetCatalog.get("uavid_train")) == 4 * 6
    assert len(DatasetCatalog.get("uavid_val")) == 2 * 6
    assert len(DatasetCatalog.get("uavid_val_full")) == 2
    test = DatasetCatalog.get("uavid_test")
    assert len(test) == 2 and "sem_seg_file_name" not in test[0]

    cfg = add_segclip_config(get_cfg())
    cfg.TEST.FORMAT_ONLY = True
    with pytest.raises(ValueError, match="no submission formatter"):
        build_evaluator(cfg, "uavid_val", str(tmp_path / "e"))  # patches: no frame layout
    ev = build_evaluator(cfg, "uavid_test", str(tmp_path / "e"))
    ev.reset()
    for rec in test:
        scores = torch.zeros(8, H, W)
        scores[2] = 1.0  # road everywhere
        ev.process([dict(rec, height=H, width=W)], [{"sem_seg": scores}])
    ev.evaluate()
    out = tmp_path / "e" / "uavid_submission" / "seq21" / "Labels"
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000100.png"]
    rgb = np.asarray(Image.open(out / "000000.png"))
    assert rgb.shape == (H, W, 3) and (rgb == np.array(UAVID.colors[2])).all()
    with zipfile.ZipFile(tmp_path / "e" / "UAVid_submission.zip") as zf:
        assert "seq21/Labels/000000.png" in zf.namelist()


def test_uavid_bad_colour_and_empty_split(tmp_path):
    src = tmp_path / "raw"
    _fake_release(src)
    bad = src / "uavid_val" / "seq16" / "Labels" / "000100.png"
    arr = np.asarray(Image.open(bad)).copy()
    arr[0, 0] = (7, 7, 7)
    _png(bad, arr)
    with pytest.raises(PrepareError, match=r"000100\.png: 1 pixels .*RGB\(7,7,7\)"):
        prep.main(["--src", str(src), "--dst", str(tmp_path / "o"), "--splits", "val"])
    assert not (tmp_path / "o" / "uavid" / "val" / "manifest.json").exists()
    assert (
        prep.main(
            ["--src", str(src), "--dst", str(tmp_path / "o"), "--splits", "val", "--skip-bad"]
        )
        == 0
    )
    for out_split in ("val", "val_full"):
        man = json.loads((tmp_path / "o" / "uavid" / out_split / "manifest.json").read_text())
        assert len(man["skipped"]) == 1
    for p in (src / "uavid_test" / "seq21" / "Images").glob("*.png"):
        p.unlink()
    with pytest.raises(PrepareError, match="empty split"):
        prep.main(["--src", str(src), "--dst", str(tmp_path / "o"), "--splits", "test"])
