"""Registration of every benchmark split: metadata from the facts module, clear errors."""

import json

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from segclip_d2.data.dataset_facts import get_facts
from segclip_d2.data.register import DatasetNotPreparedError, datasets_root

SPLITS = {
    "loveda": [
        "loveda_train",
        "loveda_val",
        "loveda_test",
        "loveda_train_urban",
        "loveda_train_rural",
        "loveda_val_urban",
        "loveda_val_rural",
        "loveda_test_urban",
        "loveda_test_rural",
    ],
    "isaid": ["isaid_train", "isaid_val", "isaid_test"],
    "uavid": ["uavid_train", "uavid_val", "uavid_val_full", "uavid_test"],
    "synthetic_aerial": ["synthetic_aerial_train", "synthetic_aerial_val"],
}


@pytest.mark.parametrize("key", sorted(SPLITS))
def test_every_split_has_facts_metadata(key):
    facts = get_facts(key)
    for name in SPLITS[key]:
        assert name in DatasetCatalog.list()
        meta = MetadataCatalog.get(name)
        assert meta.stuff_classes == list(facts.classes)
        assert meta.stuff_colors == [list(c) for c in facts.colors]
        assert meta.ignore_label == 255 and meta.evaluator_type == "sem_seg"
    assert MetadataCatalog.get("loveda_val_rural").domain == "rural"
    assert MetadataCatalog.get("loveda_test").labelled is False


def test_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    assert datasets_root() == tmp_path
    monkeypatch.delenv("DETECTRON2_DATASETS")
    assert str(datasets_root()) == "datasets"


def test_missing_and_incomplete_splits_are_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    with pytest.raises(DatasetNotPreparedError) as e:
        DatasetCatalog.get("isaid_val")
    assert str(tmp_path / "isaid" / "val") in str(e.value)
    assert "python datasets/prepare_isaid.py" in str(e.value)
    # files present but no manifest (interrupted preparation): refused, not silently partial
    split = tmp_path / "isaid" / "val"
    for sub in ("images", "labels"):
        (split / sub).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(split / sub / "P1_0_0.png")
    with pytest.raises(DatasetNotPreparedError, match="did not finish"):
        DatasetCatalog.get("isaid_val")
    (split / "manifest.json").write_text(json.dumps({"complete": True}))
    recs = DatasetCatalog.get("isaid_val")
    assert recs == [
        {
            "file_name": str(split / "images" / "P1_0_0.png"),
            "image_id": "P1_0_0",
            "sem_seg_file_name": str(split / "labels" / "P1_0_0.png"),
        }
    ]
    (split / "labels" / "P1_0_0.png").unlink()
    with pytest.raises(DatasetNotPreparedError, match="have no label"):
        DatasetCatalog.get("isaid_val")
