"""The built-in synthetic aerial dataset: tiles, on-disk generation, registration, the CLI."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import cv2
import numpy as np
import pytest
from script_helpers import load_script

from segclip_d2.data import synthetic
from segclip_d2.data.dataset_facts import IGNORE_LABEL, get_facts
from segclip_d2.data.synthetic import (
    ensure_synthetic_aerial,
    generate_tile,
    tile_scene,
    tile_seed,
)

FACTS = get_facts("synthetic_aerial")
REPO = Path(__file__).resolve().parents[1]


def _read(path: Path) -> np.ndarray:
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert arr is not None, f"{path} is not a readable PNG"
    return arr[..., ::-1] if arr.ndim == 3 else arr


def _files(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*.png"))
        if not p.name.startswith(".")
    }


@pytest.fixture
def no_env(monkeypatch):
    for var in synthetic.ENV_VARS.values():
        monkeypatch.delenv(var, raising=False)


# ------------------------------------------------------------------------------------ tiles
def test_same_seed_same_tile_and_different_seed_different_tile():
    img_a, lbl_a = generate_tile(7, 96)
    img_b, lbl_b = generate_tile(7, 96)
    img_c, lbl_c = generate_tile(8, 96)
    np.testing.assert_array_equal(img_a, img_b)
    np.testing.assert_array_equal(lbl_a, lbl_b)
    assert not np.array_equal(img_a, img_c)
    # A Generator built from the same seed gives the same tile as the seed itself.
    img_d, lbl_d = generate_tile(np.random.default_rng(7), 96)
    np.testing.assert_array_equal(img_a, img_d)
    np.testing.assert_array_equal(lbl_a, lbl_d)
    with pytest.raises(TypeError):
        generate_tile(None, 96)


@pytest.mark.parametrize("scene", ["rural", "urban"])
def test_tile_shapes_and_label_values(scene):
    image, label = generate_tile(tile_seed(0, "train", 3), 160, scene=scene, nodata_prob=1.0)
    assert image.shape == (160, 160, 3) and image.dtype == np.uint8
    assert label.shape == (160, 160) and label.dtype == np.uint8
    values = set(np.unique(label).tolist())
    assert values <= set(range(FACTS.num_classes)) | {IGNORE_LABEL}
    nodata = label == IGNORE_LABEL
    assert 0 < nodata.mean() < 0.5, "no-data border missing or too large"
    assert (image[nodata] == 0).all(), "no-data pixels must be black"
    assert image[~nodata].std() > 10, "tile has no texture"
    _, no_border = generate_tile(tile_seed(0, "train", 3), 160, scene=scene, nodata_prob=0.0)
    assert (no_border != IGNORE_LABEL).all()
    with pytest.raises(ValueError, match="size"):
        generate_tile(0, 8)
    with pytest.raises(ValueError, match="scene"):
        generate_tile(0, 64, scene="desert")


def test_default_val_set_has_every_class_in_good_measure():
    """The default seed's 16 val tiles: every class covers at least 3% of the labelled pixels."""
    counts = np.zeros(256, np.int64)
    for i in range(16):
        _, label = generate_tile(tile_seed(0, "val", i), 512, tile_scene(i))
        counts += np.bincount(label.ravel(), minlength=256)
    share = counts[: FACTS.num_classes] / counts[: FACTS.num_classes].sum()
    low = {c: round(float(s), 3) for c, s in zip(FACTS.classes, share) if s < 0.03}
    assert not low, f"classes below 3% of the val pixels: {low}"


def test_colour_alone_does_not_separate_the_classes():
    """A Bayes classifier on quantised RGB (fit on train tiles) is far from perfect on val tiles,
    yet clearly better than predicting the majority class (so colour is informative too)."""
    bits = 4

    def pixels(split, n):
        tiles = [generate_tile(tile_seed(5, split, i), 256, tile_scene(i)) for i in range(n)]
        rgb = np.concatenate([t[0].reshape(-1, 3) for t in tiles]).astype(np.int64) >> (8 - bits)
        code = (rgb[:, 0] << (2 * bits)) | (rgb[:, 1] << bits) | rgb[:, 2]
        label = np.concatenate([t[1].ravel() for t in tiles])
        keep = label != IGNORE_LABEL
        return code[keep], label[keep]

    code_tr, lbl_tr = pixels("train", 10)
    code_va, lbl_va = pixels("val", 4)
    table = np.zeros((1 << (3 * bits), FACTS.num_classes), np.int64)
    np.add.at(table, (code_tr, lbl_tr), 1)
    accuracy = float((table.argmax(1)[code_va] == lbl_va).mean())
    majority = np.bincount(lbl_va, minlength=FACTS.num_classes).max() / len(lbl_va)
    assert accuracy < 0.8, f"colour alone separates the classes (pixel accuracy {accuracy:.2f})"
    assert accuracy > majority + 0.1, (accuracy, majority)


# ------------------------------------------------------------------------------------ on disk
def test_ensure_writes_the_prepared_layout(tmp_path, no_env):
    out = ensure_synthetic_aerial(tmp_path, num_train=3, num_val=2, size=64, seed=1)
    assert out == tmp_path / "synthetic_aerial"
    for split, n in (("train", 3), ("val", 2)):
        images = sorted((out / split / "images").glob("*.png"))
        labels = sorted((out / split / "labels").glob("*.png"))
        assert [p.name for p in images] == [p.name for p in labels]
        assert len(images) == n
        for img_path, lbl_path in zip(images, labels):
            img, lbl = _read(img_path), _read(lbl_path)
            assert img.shape == (64, 64, 3) and img.dtype == np.uint8
            assert lbl.shape == (64, 64) and lbl.dtype == np.uint8
            assert set(np.unique(lbl).tolist()) <= set(range(7)) | {IGNORE_LABEL}
        # The files hold exactly the tiles generate_tile makes for these seeds.
        img0, lbl0 = generate_tile(tile_seed(1, split, 0), 64, tile_scene(0))
        np.testing.assert_array_equal(_read(images[0]), img0)
        np.testing.assert_array_equal(_read(labels[0]), lbl0)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["params"]["num_train"] == 3 and meta["params"]["seed"] == 1
    # A complete set is not rewritten.
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    ensure_synthetic_aerial(tmp_path, num_train=3, num_val=2, size=64, seed=1)
    assert stamp == {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}


def test_other_parameters_regenerate_and_drop_stale_tiles(tmp_path, no_env):
    out = ensure_synthetic_aerial(tmp_path, num_train=3, num_val=1, size=64, seed=0)
    before = _read(out / "train" / "images" / "train_0000.png")
    ensure_synthetic_aerial(tmp_path, num_train=2, num_val=1, size=64, seed=9)
    assert sorted(p.name for p in (out / "train" / "images").iterdir()) == [
        "train_0000.png",
        "train_0001.png",
    ]
    assert len(list((out / "train" / "labels").iterdir())) == 2
    assert not np.array_equal(before, _read(out / "train" / "images" / "train_0000.png"))


def test_damaged_or_unfinished_set_is_repaired(tmp_path, no_env):
    kw = dict(num_train=3, num_val=2, size=64, seed=2)
    out = ensure_synthetic_aerial(tmp_path, **kw)
    good = _files(out)
    # A truncated file is noticed even though the marker is there.
    victim = out / "train" / "labels" / "train_0001.png"
    victim.write_bytes(victim.read_bytes()[:20])
    other = out / "train" / "images" / "train_0002.png"
    stamp = other.stat().st_mtime_ns
    ensure_synthetic_aerial(tmp_path, **kw)
    assert _files(out) == good
    assert other.stat().st_mtime_ns == stamp, "intact tiles should be kept, not regenerated"
    # No marker (interrupted before the end) and a missing and a truncated file.
    (out / "meta.json").unlink()
    (out / "val" / "images" / "val_0001.png").unlink()
    victim.write_bytes(b"")
    ensure_synthetic_aerial(tmp_path, **kw)
    assert _files(out) == good
    assert (out / "meta.json").is_file()


def test_interrupted_generation_resumes(tmp_path, no_env, monkeypatch):
    kw = dict(num_train=4, num_val=2, size=64, seed=3)
    real = synthetic.generate_tile
    calls = []

    def crash_after_three(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated interruption")
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "generate_tile", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic_aerial(tmp_path, **kw)
    out = tmp_path / "synthetic_aerial"
    assert not (out / "meta.json").exists(), "marker written before the set was complete"
    calls.clear()
    monkeypatch.setattr(
        synthetic, "generate_tile", lambda *a, **k: (calls.append(a), real(*a, **k))[1]
    )
    ensure_synthetic_aerial(tmp_path, **kw)
    assert len(calls) == 3, "finished tiles should be reused, only the 3 missing ones generated"
    fresh = ensure_synthetic_aerial(tmp_path / "fresh", **kw)
    assert _files(out) == _files(fresh)


def _ensure_in_child(root: str) -> None:
    ensure_synthetic_aerial(Path(root), num_train=4, num_val=2, size=96, seed=4)


def test_two_processes_generating_at_once(tmp_path, no_env):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_ensure_in_child, args=(str(tmp_path),)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    out = tmp_path / "synthetic_aerial"
    fresh = ensure_synthetic_aerial(tmp_path / "fresh", num_train=4, num_val=2, size=96, seed=4)
    assert _files(out) == _files(fresh)
    leftovers = [p.name for p in out.rglob("*.tmp")]
    assert not leftovers


def test_environment_overrides_and_bad_values(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGCLIP_SYNTHETIC_NUM_TRAIN", "2")
    monkeypatch.setenv("SEGCLIP_SYNTHETIC_NUM_VAL", "1")
    monkeypatch.setenv("SEGCLIP_SYNTHETIC_SIZE", "48")
    out = ensure_synthetic_aerial(tmp_path)
    assert len(list((out / "train" / "images").glob("*.png"))) == 2
    assert _read(out / "val" / "labels" / "val_0000.png").shape == (48, 48)
    # Explicit arguments win over the environment.
    ensure_synthetic_aerial(tmp_path, num_train=1)
    assert len(list((out / "train" / "images").glob("*.png"))) == 1
    monkeypatch.setenv("SEGCLIP_SYNTHETIC_NUM_VAL", "lots")
    with pytest.raises(ValueError, match="SEGCLIP_SYNTHETIC_NUM_VAL"):
        ensure_synthetic_aerial(tmp_path)
    with pytest.raises(ValueError, match="at least"):
        ensure_synthetic_aerial(tmp_path, num_train=0, num_val=1)


def test_registered_splits_load_and_generate_on_first_use(tmp_path, monkeypatch):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    import segclip_d2  # noqa: F401  (registers the splits)

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    monkeypatch.setenv("SEGCLIP_SYNTHETIC_NUM_TRAIN", "3")
    monkeypatch.setenv("SEGCLIP_SYNTHETIC_NUM_VAL", "2")
    monkeypatch.setenv("SEGCLIP_SYNTHETIC_SIZE", "64")
    train = DatasetCatalog.get("synthetic_aerial_train")
    val = DatasetCatalog.get("synthetic_aerial_val")
    assert len(train) == 3 and len(val) == 2
    for rec in train + val:
        assert Path(rec["file_name"]).is_file() and Path(rec["sem_seg_file_name"]).is_file()
        assert Path(rec["file_name"]).parent.parent.parent == tmp_path / "synthetic_aerial"
    meta = MetadataCatalog.get("synthetic_aerial_train")
    assert list(meta.stuff_classes) == list(FACTS.classes)
    assert meta.ignore_label == IGNORE_LABEL


# ------------------------------------------------------------------------------------ CLI
def test_cli_generates_and_prints_a_histogram(tmp_path, no_env, capsys):
    cli = load_script("datasets/prepare_synthetic.py")
    args = ["--dst", str(tmp_path), "--num-train", "2", "--num-val", "1", "--size", "96"]
    assert cli.main(args + ["--seed", "5"]) == 0
    text = capsys.readouterr().out
    assert "2 train, 1 val tiles" in text
    for name in FACTS.classes:
        assert name in text
    rows = [
        line.split()
        for line in text.splitlines()
        if line.split()[:1] in ([c] for c in FACTS.classes)
    ]
    train_share = sum(float(r[1].rstrip("%")) for r in rows)
    assert 90.0 < train_share <= 100.01  # the rest is no-data
    stamp = (tmp_path / "synthetic_aerial" / "meta.json").stat().st_mtime_ns
    assert cli.main(args + ["--seed", "5", "--force"]) == 0
    assert (tmp_path / "synthetic_aerial" / "meta.json").stat().st_mtime_ns != stamp
    assert cli.main(args[:2] + ["--size", "8"]) == 2
    assert "size" in capsys.readouterr().err
