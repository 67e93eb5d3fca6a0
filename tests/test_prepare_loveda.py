"""datasets/prepare_loveda.py: label mapping, domains, test split, download, submission."""

import hashlib
import json
import os
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
from segclip_d2.data.evaluator import SemSegFormatOnlyEvaluator, build_evaluator
from segclip_d2.data.prepare_utils import PrepareError
from segclip_d2.data.register import DatasetNotPreparedError

REPO = Path(__file__).resolve().parents[1]


prep = load_script("datasets/prepare_loveda.py")


def _png(path: Path, arr: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _fake_split(root: Path, split: str, ids: dict, labelled: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    for domain, names in ids.items():
        for name in names:
            _png(
                root / split / domain / "images_png" / f"{name}.png",
                rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
            )
            if labelled:
                _png(
                    root / split / domain / "masks_png" / f"{name}.png",
                    rng.integers(0, 8, (32, 32), dtype=np.uint8),
                )


def _reference_ids(raw: np.ndarray) -> np.ndarray:
    return np.where(raw == 0, 255, raw.astype(np.int64) - 1).astype(np.uint8)


def test_real_loveda_masks_and_domain_splits(shared_data, tmp_path, monkeypatch):
    src = tmp_path / "raw"
    rural = src / "Train" / "Rural"
    (rural / "images_png").mkdir(parents=True)
    (rural / "masks_png").mkdir(parents=True)
    for i in (0, 1):
        os.symlink(
            shared_data / "loveda" / "images" / f"{i}.png", rural / "images_png" / f"{i}.png"
        )
        os.symlink(shared_data / "loveda" / "masks" / f"{i}.png", rural / "masks_png" / f"{i}.png")
    _fake_split(src, "Train", {"Urban": ["1366"]}, labelled=True)
    _fake_split(src, "Val", {"Urban": ["3514"], "Rural": ["2522"]}, labelled=True)
    dst = tmp_path / "out"
    assert prep.main(["--src", str(src), "--dst", str(dst)]) == 0  # Test/ absent: noted, skipped
    out = dst / "loveda" / "train"
    for i in (0, 1):
        raw = np.asarray(Image.open(shared_data / "loveda" / "masks" / f"{i}.png"))
        lbl = np.asarray(Image.open(out / "labels" / f"rural_{i}.png"))
        np.testing.assert_array_equal(lbl, _reference_ids(raw))
        assert set(np.unique(lbl)) <= set(range(7))
        # the image is copied byte for byte
        assert (out / "images" / f"rural_{i}.png").read_bytes() == (
            shared_data / "loveda" / "images" / f"{i}.png"
        ).read_bytes()
    # the fake masks contain raw 0 -> ignore
    raw = np.asarray(Image.open(src / "Train" / "Urban" / "masks_png" / "1366.png"))
    assert (raw == 0).any()
    lbl = np.asarray(Image.open(out / "labels" / "urban_1366.png"))
    np.testing.assert_array_equal(lbl, _reference_ids(raw))

    monkeypatch.setenv("DETECTRON2_DATASETS", str(dst))
    rural_recs = DatasetCatalog.get("loveda_train_rural")
    assert [Path(r["file_name"]).name for r in rural_recs] == ["rural_0.png", "rural_1.png"]
    assert len(DatasetCatalog.get("loveda_train_urban")) == 1
    assert len(DatasetCatalog.get("loveda_train")) == 3
    assert len(DatasetCatalog.get("loveda_val_urban")) == 1
    with pytest.raises(DatasetNotPreparedError, match="prepare_loveda.py"):
        DatasetCatalog.get("loveda_test")
    hist = json.loads((out / "manifest.json").read_text())["class_pixels"]
    assert hist["agriculture"] > hist["building"] > 0


def test_test_split_and_server_format(tmp_path, monkeypatch):
    src = tmp_path / "raw"
    _fake_split(src, "Test", {"Urban": ["5167", "5168"], "Rural": ["4191"]}, labelled=False)
    dst = tmp_path / "out"
    assert prep.main(["--src", str(src), "--dst", str(dst), "--splits", "test"]) == 0
    monkeypatch.setenv("DETECTRON2_DATASETS", str(dst))
    recs = DatasetCatalog.get("loveda_test")
    assert len(recs) == 3 and all("sem_seg_file_name" not in r for r in recs)
    cfg = add_segclip_config(get_cfg())
    cfg.TEST.FORMAT_ONLY = True
    ev = build_evaluator(cfg, "loveda_test", str(tmp_path / "eval"))
    assert isinstance(ev, SemSegFormatOnlyEvaluator)
    ev.reset()
    expected = {}
    for i, rec in enumerate(recs):
        scores = torch.zeros(7, 32, 32)
        scores[i + 2, :, :16] = 1.0  # left half class i+2, right half class 0
        ev.process([dict(rec, height=32, width=32)], [{"sem_seg": scores}])
        expected[Path(rec["file_name"]).stem.split("_", 1)[1] + ".png"] = i + 2
    assert ev.evaluate() == {}
    with zipfile.ZipFile(tmp_path / "eval" / "Result.zip") as zf:
        assert sorted(zf.namelist()) == sorted(expected)  # original names, no folder
        for name, cls in expected.items():
            zf.extract(name, tmp_path / "unz")
            arr = np.asarray(Image.open(tmp_path / "unz" / name))
            assert arr.ndim == 2 and arr.dtype == np.uint8
            assert (arr[:, :16] == cls).all() and (arr[:, 16:] == 0).all()
    cfg.TEST.FORMAT_ONLY = False
    with pytest.raises(ValueError, match="FORMAT_ONLY"):
        build_evaluator(cfg, "loveda_test", str(tmp_path / "eval"))


def test_bad_value_and_missing_domain(tmp_path):
    src = tmp_path / "raw"
    _fake_split(src, "Val", {"Urban": ["1"], "Rural": ["2"]}, labelled=True)
    _png(src / "Val" / "Rural" / "masks_png" / "2.png", np.full((32, 32), 9, np.uint8))
    with pytest.raises(PrepareError, match=r"2\.png: label values outside .* 9 \(1024 px\)"):
        prep.main(["--src", str(src), "--dst", str(tmp_path / "o")])
    assert prep.main(["--src", str(src), "--dst", str(tmp_path / "o"), "--skip-bad"]) == 0
    man = json.loads((tmp_path / "o" / "loveda" / "val" / "manifest.json").read_text())
    assert len(man["skipped"]) == 1 and man["num_items"] == 1
    _fake_split(src, "Train", {"Urban": ["3"]}, labelled=True)
    with pytest.raises(PrepareError, match=r"Rural.*images_png: folder not found"):
        prep.main(["--src", str(src), "--dst", str(tmp_path / "o"), "--splits", "train"])


def _fake_archive(tmp_path: Path) -> tuple[Path, str]:
    tree = tmp_path / "zipsrc"
    _fake_split(tree, "Train", {"Urban": ["10"], "Rural": ["11"]}, labelled=True)
    server = tmp_path / "server"
    server.mkdir()
    archive = server / "Train.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(tree.rglob("*.png")):
            zf.write(p, p.relative_to(tree).as_posix())
    return server, hashlib.md5(archive.read_bytes()).hexdigest()


def test_download_verifies_checksum(tmp_path):
    server, md5 = _fake_archive(tmp_path)
    src, dst = tmp_path / "raw", tmp_path / "out"
    base = [
        "--src",
        str(src),
        "--dst",
        str(dst),
        "--splits",
        "train",
        "--download",
        "--download-url",
        server.as_uri(),
    ]
    # the fake archive does not match the published size/md5: refused, nothing left behind
    with pytest.raises(PrepareError, match="Train.zip"):
        prep.main(base)
    assert not (src / "Train.zip").exists() and not (src / "Train").exists()
    with pytest.raises(PrepareError, match="does not match"):
        prep.main(base + ["--expected-md5", "Train.zip=" + "0" * 32])
    assert prep.main(base + ["--expected-md5", f"Train.zip={md5}"]) == 0
    assert (src / "Train" / "Urban" / "images_png" / "10.png").is_file()
    assert len(list((dst / "loveda" / "train" / "labels").glob("*.png"))) == 2
    # a second run reuses the extracted folder (no download)
    (server / "Train.zip").unlink()
    assert prep.main(base + ["--expected-md5", f"Train.zip={md5}"]) == 0
