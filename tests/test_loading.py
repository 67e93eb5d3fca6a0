"""The one loader: checkpoint files (checkpoint/files.py), configs parsed once and safely
(config/load.py), and the ready model / predictor (predict/load.py)."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from segclip_d2.checkpoint.files import (
    CorruptCheckpointError,
    UntrustedCheckpointError,
    check_finite,
    detectron2_layout,
    read_checkpoint,
)
from segclip_d2.errors import UserError

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "synthetic" / "segclip_cpu.yaml")


def _r50_like() -> dict:
    """A detectron2 / torchvision-converted backbone file: a dict of numpy arrays."""
    g = np.random.default_rng(0)
    return {
        "model": {
            "stem.conv1.weight": g.normal(size=(4, 3, 3, 3)).astype(np.float32),
            "stem.conv1.norm.running_mean": np.zeros(4, np.float32),
            "res2.0.conv1.weight": g.normal(size=(4, 4, 1, 1)).astype(np.float32),
        },
        "__author__": "torchvision",
        "matching_heuristics": True,
    }


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_detectron2_style_pkl_of_plain_arrays_loads(tmp_path, protocol):
    path = tmp_path / "R-50.pkl"
    data = _r50_like()
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    loaded = read_checkpoint(str(path))
    assert loaded["__author__"] == "torchvision" and loaded["matching_heuristics"] is True
    for k, v in data["model"].items():
        np.testing.assert_array_equal(loaded["model"][k], v)
    assert detectron2_layout(loaded, str(path)) is loaded  # model-zoo layout kept as is


def test_caffe2_blobs_pkl_gets_detectron2_layout(tmp_path):
    path = tmp_path / "caffe2.pkl"
    blobs = {"conv1_w": np.ones((2, 3, 1, 1), np.float32), "conv1_w_momentum": np.zeros(1)}
    path.write_bytes(pickle.dumps({"blobs": blobs}, protocol=2))
    out = detectron2_layout(read_checkpoint(str(path)), str(path))
    assert out["__author__"] == "Caffe2" and out["matching_heuristics"] is True
    assert list(out["model"]) == ["conv1_w"]  # momentum blobs dropped


def test_pkl_loads_into_a_model_through_the_detectron2_checkpointer(tmp_path):
    """Training's MODEL.WEIGHTS path: SegCLIPCheckpointer._load_file reads the .pkl safely and
    detectron2's name-matching heuristics map it onto the model."""
    from segclip_d2.checkpoint.checkpointer import SegCLIPCheckpointer

    class Stem(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Module()
            self.stem.conv1 = nn.Conv2d(3, 4, 3, bias=False)

    path = tmp_path / "R-50.pkl"
    path.write_bytes(pickle.dumps(_r50_like()))
    model = Stem()
    SegCLIPCheckpointer(model).load(str(path))
    want = torch.from_numpy(_r50_like()["model"]["stem.conv1.weight"])
    torch.testing.assert_close(model.stem.conv1.weight.data, want)


@pytest.mark.parametrize(
    "payload,error,text",
    [
        ({"model": {"w": np.array([object()], dtype=object)}}, UntrustedCheckpointError, "refused"),
        ({"model": {"w": slice(1)}}, UntrustedCheckpointError, "refused global builtins.slice"),
        ([np.zeros(2)], CorruptCheckpointError, "a dict of weights expected"),
    ],
    ids=["object-array", "other-builtin", "not-a-dict"],
)
def test_pkl_with_anything_but_plain_arrays_is_refused(tmp_path, payload, error, text):
    path = tmp_path / "odd.pkl"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(error) as info:
        read_checkpoint(str(path))
    assert str(path) in info.value.line() and text in info.value.line()


def test_truncated_pkl_is_corrupt_not_refused(tmp_path):
    path = tmp_path / "cut.pkl"
    path.write_bytes(pickle.dumps(_r50_like())[:50])
    with pytest.raises(CorruptCheckpointError, match="truncated or corrupt"):
        read_checkpoint(str(path))


def test_check_finite_names_the_file_and_the_tensors():
    ok = {"a": torch.ones(2), "n": torch.tensor([3]), "b": np.ones(2, np.float32)}
    check_finite(ok, "x.pth")
    bad = dict(ok, c=torch.tensor([float("inf")]), d=np.array([np.nan], np.float32))
    with pytest.raises(UserError) as info:
        check_finite(bad, "x.pth")
    line = info.value.line()
    assert line.startswith("x.pth: has non-finite weights") and "2 of 4 tensors (c, d)" in line


# ---------------------------------------------------------------------- configs
def test_load_config_equals_detectron2_merge_of_every_config():
    """Parsing each file once with the safe loader and merging the mappings gives the config
    fvcore's own _BASE_ merge gives (``load_yaml_with_base`` with ``allow_unsafe=False``: safe
    YAML there too, never the Python-tag fallback)."""
    from detectron2.config import get_cfg

    from segclip_d2.config import add_segclip_config, load_config

    files = sorted((REPO / "configs").rglob("*.yaml"))
    assert files
    for path in files:
        ours = load_config(str(path))
        theirs = add_segclip_config(get_cfg())
        loaded = theirs.load_yaml_with_base(str(path), allow_unsafe=False)
        theirs.merge_from_other_cfg(type(theirs)(loaded))
        assert ours.dump() == theirs.dump(), path


def test_config_text_from_a_card_roundtrips_and_refuses_tags():
    from segclip_d2.config.load import load_config, load_config_text

    cfg = load_config(CONFIG, ["SOLVER.MAX_ITER", "7"])
    again = load_config_text(cfg.dump(), "card")
    assert yaml.safe_load(again.dump()) == yaml.safe_load(cfg.dump())  # (dumps differ in anchors)
    assert again.SOLVER.MAX_ITER == 7
    with pytest.raises(UserError, match="card: holds a Python tag"):
        load_config_text("SEED: !!python/object/apply:os.getpid []\n", "card")
    with pytest.raises(UserError, match="a stored config cannot have a _BASE_"):
        load_config_text(f"_BASE_: {CONFIG}\n", "card")


# ---------------------------------------------------------------------- the ready model
TINY = ["MODEL.SEGCLIP.HIDDEN_DIM", "32", "MODEL.SEGCLIP.DEC_LAYERS", "1",
        "MODEL.SEGCLIP.MASK_DIM", "32", "MODEL.SEGCLIP.PIXEL_DECODER.CONVS_DIM", "32",
        "MODEL.SEGCLIP.PIXEL_DECODER.ENC_LAYERS", "1",
        "MODEL.SEGCLIP.NUM_QUERIES", "8"]  # fmt: skip


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model saved with its model card; (path, cfg, state_dict)."""
    from segclip_d2.checkpoint.card import CARD_KEY, build_model_card
    from segclip_d2.predict.load import load_model

    cfg, model = load_model(
        CONFIG, opts=TINY, precision="fp32", optimize=False, allow_random_weights=True
    )
    with torch.no_grad():  # weights no random init reproduces
        for p in model.parameters():
            p.add_(0.01)
    path = tmp_path_factory.mktemp("ck") / "model_final.pth"
    torch.save({"model": model.state_dict(), CARD_KEY: build_model_card(cfg, model)}, path)
    return str(path), cfg, {k: v.clone() for k, v in model.state_dict().items()}


def test_predictor_from_the_card_alone_predicts_as_from_the_config(saved):
    """config_file=None: the config comes from the checkpoint's model card; the result is the
    same model, with the card's classes and colours, on the interface of OnnxSegmenter."""
    from segclip_d2.predict.load import build_predictor

    path, cfg, state = saved
    by_card = build_predictor(None, path, precision="fp32")
    by_config = build_predictor(CONFIG, path, opts=TINY, precision="fp32")
    for k, v in state.items():
        torch.testing.assert_close(by_card.model.state_dict()[k], v)
    assert by_card.class_names == list(cfg_classes(cfg)) and len(by_card.colors) == 7
    assert by_card.card["format"] == "segclip-model-card/1" and by_card.precision == "fp32"
    rgb = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    valid = np.ones((40, 56), bool)
    valid[:5] = False
    ids, probs = by_card(rgb, valid)
    ids2, probs2 = by_config(rgb, valid)
    assert ids.shape == (40, 56) and probs.shape == (7, 40, 56) and probs.dtype == np.float32
    assert (ids[:5] == 255).all() and np.allclose(probs.sum(0), 1, atol=1e-5)
    np.testing.assert_array_equal(ids, ids2)
    np.testing.assert_allclose(probs, probs2, atol=1e-6)
    assert by_card(rgb)[0].max() < 7  # valid=None: every pixel predicted


def cfg_classes(cfg):
    from detectron2.data import MetadataCatalog

    return MetadataCatalog.get(cfg.DATASETS.TEST[0]).stuff_classes


def test_load_model_refuses_random_weights_unless_allowed(saved):
    from segclip_d2.predict.load import load_model

    with pytest.raises(UserError, match="MODEL.WEIGHTS: empty"):
        load_model(CONFIG, opts=TINY)
    with pytest.raises(UserError, match="no such file"):
        load_model(CONFIG, "/nonexistent/model.pth", opts=TINY)


def test_load_model_refuses_a_checkpoint_that_does_not_fit(saved, tmp_path):
    from segclip_d2.predict.load import load_model

    path, _, state = saved
    partial = tmp_path / "partial.pth"
    torch.save({"model": {k: v for k, v in list(state.items())[1:]}}, partial)
    with pytest.raises(UserError, match="does not fit the model built from this config"):
        load_model(CONFIG, str(partial), opts=TINY, optimize=False)


def test_weights_are_read_once_and_before_the_build(saved, monkeypatch):
    """The file is opened once (its content handed to the checkpointer), and a refused file
    fails before any model is built."""
    import segclip_d2.checkpoint.checkpointer as ck
    import segclip_d2.predict.load as load

    calls = []
    real = load.read_checkpoint
    monkeypatch.setattr(load, "read_checkpoint", lambda p: calls.append(p) or real(p))
    monkeypatch.setattr(ck, "read_checkpoint", lambda p: calls.append(p) or real(p))
    load.load_model(CONFIG, saved[0], opts=TINY, optimize=False)
    assert calls == [saved[0]]
