"""The Deepness plugin's tiling as reproduced by segclip_d2.deploy.deepness (numpy only), the
metadata the export writes for it, and the resolution rules of tools/export_onnx.py."""

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from segclip_d2.deploy.deepness import (
    deepness_class_ids,
    deepness_grid,
    median_filter_ids,
    overlap_pixels,
    threshold_argmax,
)
from segclip_d2.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_grid_of_the_reported_raster():
    """The issue's 1024 px raster, tile 512, 15% overlap: 76 px, 1384 px padded, 3 x 3 tiles."""
    g = deepness_grid(1024, 1024, 512, 15)
    assert (g.overlap, g.stride, g.padded_height, g.padded_width) == (76, 436, 1384, 1384)
    assert (g.rows, g.cols, g.top) == (3, 3, 360)
    assert overlap_pixels(512, 50) == 256 and overlap_pixels(512, 10) == 51
    one = deepness_grid(300, 512, 512, 15)  # not longer than a tile: one tile, padded to it
    assert (one.padded_height, one.padded_width, one.rows, one.cols, one.top) == (
        512,
        512,
        1,
        1,
        212,
    )
    with pytest.raises(ValueError, match="no stride"):
        deepness_grid(100, 100, 64, 100)


def one_hot(values: np.ndarray, k: int) -> np.ndarray:
    """(B, S, S) ints -> (B, k, S, S) one-hot float32 probabilities."""
    return (np.arange(k)[None, :, None, None] == values[:, None]).astype(np.float32)


def test_every_pixel_comes_back_from_its_own_place():
    """A model that predicts each pixel's red value: the tiled result is the red channel, so the
    padding (black, top and right) and the pasting put every tile back where it was cut."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(1, 256, (150, 170, 3), dtype=np.uint8)  # never black

    def red(tiles):
        return one_hot(tiles[..., 0].astype(np.int64), 256)

    ids = deepness_class_ids(red, rgb, 64, 15, batch_size=4)
    np.testing.assert_array_equal(ids, rgb[..., 0])

    seen = []

    def black_padding(tiles):  # class 1 where the tile is black padding
        seen.append(tiles)
        return one_hot((tiles.max(-1) == 0).astype(np.int64), 2)

    assert (deepness_class_ids(black_padding, rgb, 64, 15) == 0).all()
    tiles = np.concatenate(seen)  # 3 x 3 tiles; padding: 24 rows on top, 4 columns on the right
    assert tiles.shape == (9, 64, 64, 3)
    assert (tiles[0, :24] == 0).all() and (tiles[0, 24:] > 0).all()
    assert (tiles[2, :, -4:] == 0).all() and (tiles[2, 24:, :-4] > 0).all()


def test_tile_centres_are_pasted_and_later_tiles_win():
    """Each tile predicts its own number: the seams sit half an overlap into the shared part."""
    calls = []

    def tile_number(tiles):
        calls.extend(range(len(calls), len(calls) + len(tiles)))
        return one_hot(np.broadcast_to(np.array(calls[-len(tiles) :])[:, None, None],
                                       tiles.shape[:3]), 9)  # fmt: skip

    ids = deepness_class_ids(tile_number, np.full((64, 174, 3), 7, np.uint8), 64, 15)
    # one row of 3 tiles at x = 0, 55, 110; overlap 9 px, half 4: seams at 55 + 4, 110 + 4
    row = ids[0]
    assert (row[:59] == 0).all() and (row[59:114] == 1).all() and (row[114:] == 2).all()


def test_threshold_relabels_uncertain_pixels_as_class_zero():
    probs = np.array([0.2, 0.45, 0.35], np.float32)[None, :, None, None]  # no class reaches 0.5
    assert threshold_argmax(probs, 0.5)[0, 0, 0] == 0  # Deepness's 0.5: becomes class 0
    assert threshold_argmax(probs, 0.0)[0, 0, 0] == 1  # 0 (what the export writes): arg-max


def test_median_filter_is_off_at_zero_and_smooths_at_seven():
    ids = np.zeros((20, 20), np.int64)
    ids[10, 10] = 3
    assert median_filter_ids(ids, 0) is ids
    assert (median_filter_ids(ids, 7) == 0).all()


def test_metadata_for_deepness(tmp_path):
    from segclip_d2.deploy.export import DEFAULT_SEG_THRESH, deepness_metadata, export_card

    card = {"input": {"pixel_mean": [0, 0, 0], "pixel_std": [255, 255, 255]},
            "training": {"iteration": 299},
            "metrics": {"sem_seg/mIoU": 60.5, "evaluated_at_iteration": 149}}  # fmt: skip
    meta = {k: json.loads(v) for k, v in deepness_metadata(card, 512, ["a", "b"], 30.0).items()}
    assert meta["resolution"] == 30.0 and meta["seg_thresh"] == DEFAULT_SEG_THRESH == 0
    assert meta["seg_small_segment"] == 0 and meta["tiles_overlap"] >= 0
    assert meta["segclip_model_card"]["metrics"] == {}  # stale: iteration 149 vs 299
    assert "149" in meta["segclip_model_card"]["metrics_note"]
    assert "resolution" not in deepness_metadata(card, 512, ["a", "b"], None)
    fresh = dict(card, metrics={"sem_seg/mIoU": 74.3, "evaluated_at_iteration": 299})
    assert export_card(fresh)["metrics"]["sem_seg/mIoU"] == 74.3
    assert "metrics_note" not in export_card(fresh)


def load_export_tool():
    spec = importlib.util.spec_from_file_location("export_onnx", REPO / "tools" / "export_onnx.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    "card_gsd, cfg_gsd, flag, expected",
    [(0.3, 0.0, None, 30.0), (None, 0.3, None, 30.0), (None, 0.0, 30.0, 30.0),
     (0.5, 0.3, None, 50.0), (0.3, 0.3, 25.0, 25.0)],
)  # fmt: skip
def test_resolution_comes_from_the_card_the_config_or_the_flag(card_gsd, cfg_gsd, flag, expected):
    tool = load_export_tool()
    args = SimpleNamespace(resolution_cm=flag, allow_unknown_resolution=False, weights="m.pth")
    cfg = SimpleNamespace(INPUT=SimpleNamespace(GSD_M=cfg_gsd))
    card = {"training": {"gsd_m": card_gsd}}
    assert tool.model_resolution_cm(args, cfg, card) == pytest.approx(expected)


def test_unknown_resolution_is_refused_unless_allowed():
    tool = load_export_tool()
    args = SimpleNamespace(resolution_cm=None, allow_unknown_resolution=False, weights="m.pth")
    cfg = SimpleNamespace(INPUT=SimpleNamespace(GSD_M=0.0))
    with pytest.raises(UserError) as e:
        tool.model_resolution_cm(args, cfg, {"training": {"gsd_m": None}})
    for way in ("--resolution-cm", "INPUT.GSD_M", "--allow-unknown-resolution"):
        assert way in str(e.value)
    args.allow_unknown_resolution = True
    assert tool.model_resolution_cm(args, cfg, {"training": {"gsd_m": None}}) is None
    args.resolution_cm = -1.0
    with pytest.raises(UserError, match="positive"):
        tool.model_resolution_cm(args, cfg, {})
