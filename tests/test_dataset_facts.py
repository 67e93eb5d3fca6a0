"""The single module of dataset facts: encodings, palettes and their errors."""

import numpy as np
import pytest

from segclip_d2.data.dataset_facts import (
    DATASETS,
    IGNORE_LABEL,
    ISAID,
    LOVEDA,
    UAVID,
    get_facts,
    prompt_name,
)


def test_class_counts_and_order_match_the_benchmarks():
    assert LOVEDA.classes[:3] == ("background", "building", "road")
    assert LOVEDA.num_classes == 7
    assert ISAID.num_classes == 16 and ISAID.classes[9] == "small_vehicle"
    assert UAVID.classes == (
        "clutter",
        "building",
        "road",
        "tree",
        "low_vegetation",
        "moving_car",
        "static_car",
        "human",
    )
    assert get_facts("synthetic_aerial").classes == LOVEDA.classes
    for facts in DATASETS.values():
        assert len(set(facts.colors)) == facts.num_classes, f"{facts.key}: duplicate colours"
        assert facts.ignore_label == IGNORE_LABEL


def test_prompt_names_are_cleaned():
    assert prompt_name("small_vehicle") == "small vehicle"
    assert prompt_name("ground_track_field") == "ground track field"
    assert ISAID.prompt_names[13] == "soccer ball field"


def test_loveda_index_mapping():
    raw = np.arange(8, dtype=np.uint8).reshape(2, 4)
    ids = LOVEDA.raw_to_train_ids(raw)
    assert ids.tolist() == [[IGNORE_LABEL, 0, 1, 2], [3, 4, 5, 6]]


def test_index_values_outside_encoding_name_file_and_values():
    raw = np.array([[1, 8, 8], [200, 2, 3]], dtype=np.uint8)
    with pytest.raises(ValueError, match=r"tile\.png.*8 \(2 px\), 200 \(1 px\)"):
        LOVEDA.raw_to_train_ids(raw, "tile.png")
    with pytest.raises(ValueError, match="single-channel"):
        LOVEDA.raw_to_train_ids(np.zeros((2, 2, 3), np.uint8), "rgb.png")


@pytest.mark.parametrize("facts", [ISAID, UAVID], ids=lambda f: f.key)
def test_rgb_palette_round_trip(facts):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, facts.num_classes, size=(13, 17)).astype(np.uint8)
    rgb = np.array(facts.colors, dtype=np.uint8)[ids]
    assert np.array_equal(facts.raw_to_train_ids(rgb), ids)
    assert np.array_equal(facts.colorize(ids), rgb)


def test_colour_outside_palette_names_file_count_and_colour():
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[0, :3] = (1, 2, 3)
    with pytest.raises(ValueError, match=r"P1\.png: 3 pixels .*RGB\(1,2,3\) \(3 px\)"):
        ISAID.raw_to_train_ids(rgb, "P1.png")


def test_real_isaid_mask_uses_only_palette_colours(shared_data):
    from PIL import Image

    path = shared_data / "isaid" / "semantic_masks" / "P0003_instance_color_RGB.png"
    ids = ISAID.raw_to_train_ids(np.asarray(Image.open(path).convert("RGB")), str(path))
    present = {ISAID.classes[i] for i in np.unique(ids)}
    # The sample's README lists small vehicle, large vehicle and storage tank.
    assert present == {"background", "small_vehicle", "large_vehicle", "storage_tank"}


def test_unknown_dataset_key():
    with pytest.raises(KeyError, match="unknown dataset 'potsdam'"):
        get_facts("potsdam")
