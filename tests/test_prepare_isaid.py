"""datasets/prepare_isaid.py: patches, palette conversion, bad input, reruns."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from script_helpers import load_script

from segclip_d2.data.dataset_facts import get_facts
from segclip_d2.data.prepare_utils import PrepareError, patch_windows, window_starts

REPO = Path(__file__).resolve().parents[1]
ISAID = get_facts("isaid")


prep = load_script("datasets/prepare_isaid.py")


def _png(path: Path, arr: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _real_tree(shared: Path, root: Path) -> Path:
    """The two labelled real images in the official layout (symlinks): P0005 train, P0003 val."""
    for split, pid in (("train", "P0005"), ("val", "P0003")):
        (root / split / "images").mkdir(parents=True)
        (root / split / "Semantic_masks" / "images").mkdir(parents=True)
        os.symlink(
            shared / "isaid" / "images" / f"{pid}.png", root / split / "images" / f"{pid}.png"
        )
        name = f"{pid}_instance_color_RGB.png"
        os.symlink(
            shared / "isaid" / "semantic_masks" / name,
            root / split / "Semantic_masks" / "images" / name,
        )
    return root


def _fake_tree(root: Path, n: int = 2, size=(64, 80), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    pal = np.array(ISAID.colors, dtype=np.uint8)
    for split in ("train", "val"):
        for i in range(n):
            img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            ids = rng.integers(0, ISAID.num_classes, size)
            _png(root / split / "images" / f"P{i:04d}.png", img)
            _png(
                root / split / "Semantic_masks" / "images" / f"P{i:04d}_instance_color_RGB.png",
                pal[ids],
            )
    return root


def test_window_starts_cover_and_stay_inside():
    assert window_starts(1147, 896, 512) == [0, 251]
    assert window_starts(896, 896, 512) == [0]
    assert window_starts(500, 896, 512) == [0]  # smaller than the patch: padded
    assert window_starts(2000, 896, 512) == [0, 512, 1024, 1104]
    for length in (897, 1500, 4000):
        starts = window_starts(length, 896, 512)
        assert starts[-1] + 896 == length
        assert all(b - a <= 512 for a, b in zip(starts, starts[1:]))


def test_real_isaid_default_and_small_patches(shared_data, tmp_path):
    src = _real_tree(shared_data, tmp_path / "raw")
    # default 896 / 512: P0003 (1147x1023) -> 2x2 windows, P0005 (884x977) -> 1 col x 2 rows
    assert prep.main(["--src", str(src), "--dst", str(tmp_path / "d896")]) == 0
    for split, n in (("train", 2), ("val", 4)):
        out = tmp_path / "d896" / "isaid" / split
        assert len(list((out / "images").glob("*.png"))) == n
        man = json.loads((out / "manifest.json").read_text())
        assert man["complete"] and man["num_items"] == n
        for p in (out / "images").glob("*.png"):
            assert Image.open(p).size == (896, 896)
    # smaller patches: every label patch equals the window of the whole-image conversion
    dst = tmp_path / "d384"
    assert (
        prep.main(["--src", str(src), "--dst", str(dst), "--patch-size", "384", "--stride", "256"])
        == 0
    )
    for split, pid in (("train", "P0005"), ("val", "P0003")):
        img = np.asarray(Image.open(src / split / "images" / f"{pid}.png").convert("RGB"))
        raw = np.asarray(
            Image.open(
                src / split / "Semantic_masks" / "images" / f"{pid}_instance_color_RGB.png"
            ).convert("RGB")
        )
        full = ISAID.raw_to_train_ids(raw)
        h, w = full.shape
        wins = patch_windows(h, w, 384, 256)
        out = dst / "isaid" / split
        assert len(list((out / "labels").glob("*.png"))) == len(wins) > 4
        for y0, x0 in wins:
            stem = f"{pid}_{y0:05d}_{x0:05d}"
            lbl = np.asarray(Image.open(out / "labels" / f"{stem}.png"))
            pim = np.asarray(Image.open(out / "images" / f"{stem}.png"))
            assert lbl.dtype == np.uint8 and lbl.shape == (384, 384)
            np.testing.assert_array_equal(lbl, full[y0 : y0 + 384, x0 : x0 + 384])
            np.testing.assert_array_equal(pim, img[y0 : y0 + 384, x0 : x0 + 384])
    hist = json.loads((dst / "isaid" / "val" / "manifest.json").read_text())["class_pixels"]
    assert hist["small_vehicle"] > 0 and hist["large_vehicle"] > 0 and hist["plane"] == 0


def test_small_image_is_padded_with_ignore(tmp_path):
    src = _fake_tree(tmp_path / "raw", n=1, size=(40, 50))
    dst = tmp_path / "out"
    assert (
        prep.main(
            [
                "--src",
                str(src),
                "--dst",
                str(dst),
                "--patch-size",
                "64",
                "--stride",
                "32",
                "--splits",
                "train",
            ]
        )
        == 0
    )
    lbl = np.asarray(Image.open(dst / "isaid/train/labels/P0000_00000_00000.png"))
    img = np.asarray(Image.open(dst / "isaid/train/images/P0000_00000_00000.png"))
    assert lbl.shape == (64, 64) and (lbl[40:] == 255).all() and (lbl[:, 50:] == 255).all()
    assert (lbl[:40, :50] != 255).all() and (img[40:] == 0).all()


def test_rerun_skips_finished_sources(tmp_path):
    src = _fake_tree(tmp_path / "raw", n=3)
    dst = tmp_path / "out"
    args = ["--src", str(src), "--dst", str(dst), "--patch-size", "32", "--stride", "32"]
    assert prep.main(args) == 0
    out = dst / "isaid" / "train"
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    # simulate an interruption after P0000 and P0001: P0002's marker and manifest are gone
    (out / ".progress" / "P0002.json").unlink()
    (out / "manifest.json").unlink()
    assert prep.main(args) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["num_items"] == 3 * 6
    for p, t in stamps.items():
        if p.name.startswith("P0002"):
            assert p.stat().st_mtime_ns >= t
        else:
            assert p.stat().st_mtime_ns == t, f"{p} was rewritten"
    # other options on an existing output: refused unless --overwrite
    with pytest.raises(PrepareError, match="different options"):
        prep.main(args[:4] + ["--patch-size", "16", "--stride", "16"])
    assert prep.main(args[:4] + ["--patch-size", "16", "--stride", "16", "--overwrite"]) == 0


@pytest.mark.parametrize("problem", ["missing_mask", "size", "colour", "truncated"])
def test_bad_input_errors_and_skip_bad(tmp_path, capsys, problem):
    src = _fake_tree(tmp_path / "raw", n=3)
    mask = src / "train" / "Semantic_masks" / "images" / "P0001_instance_color_RGB.png"
    image = src / "train" / "images" / "P0001.png"
    if problem == "missing_mask":
        mask.unlink()
        expect, named = "missing", mask
    elif problem == "size":
        _png(mask, np.zeros((60, 80, 3), np.uint8))
        expect, named = "differs", mask
    elif problem == "colour":
        arr = np.zeros((64, 80, 3), np.uint8)
        arr[:2, :3] = (1, 2, 3)
        _png(mask, arr)
        expect, named = r"6 pixels have colours outside .*RGB\(1,2,3\) \(6 px\)", mask
    else:
        data = image.read_bytes()
        image.write_bytes(data[: len(data) // 2])
        expect, named = "truncated or corrupt", image
    dst = tmp_path / "out"
    args = ["--src", str(src), "--dst", str(dst), "--patch-size", "32", "--stride", "32"]
    assert prep.run_cli(prep.main, args) == 2
    err = capsys.readouterr().err
    assert str(named) in err
    with pytest.raises(PrepareError, match=expect):
        prep.main(args)
    # the failed split does not look complete
    assert not (dst / "isaid" / "train" / "manifest.json").exists()
    assert prep.main(args + ["--skip-bad"]) == 0
    man = json.loads((dst / "isaid" / "train" / "manifest.json").read_text())
    assert len(man["skipped"]) == 1 and "P0001" in man["skipped"][0]["source"]
    assert man["num_sources"] == 2 and man["num_items"] == 2 * 6
    out = capsys.readouterr().out
    assert "skipped" in out


def test_empty_split_and_missing_layout(tmp_path):
    src = _fake_tree(tmp_path / "raw", n=1)
    for p in (src / "val" / "images").glob("*.png"):
        p.unlink()
    with pytest.raises(PrepareError, match="empty split"):
        prep.main(["--src", str(src), "--dst", str(tmp_path / "o")])
    with pytest.raises(PrepareError, match="official iSAID layout"):
        prep.main(["--src", str(src), "--dst", str(tmp_path / "o"), "--splits", "test"])
    # layout is verified before anything is written
    assert not (tmp_path / "o" / "isaid" / "train").exists()
