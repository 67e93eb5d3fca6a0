"""Test-session settings shared by every test file."""

import os
from pathlib import Path

import pytest

# Tests never reach a model hub: CLIP weights are not downloadable here, models use random init.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
# The real sample data (../shared/data next to the checkout; SEGCLIP_SHARED_DATA overrides).
SHARED_DATA = Path(os.environ.get("SEGCLIP_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real sample data folder (../shared/data); the test is skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def hub_offline(monkeypatch):
    """HF_HUB_OFFLINE=1 for this test even when the caller's environment says otherwise."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def private_model_cache(monkeypatch):
    """Models loaded from temporary checkpoints are dropped after the test (400 MB each)."""
    from segclip_d2.checkpoint import pretrained as weights

    monkeypatch.setattr(weights, "_MODELS", dict(weights._MODELS))


# ------------------------------------------------------------------ the demo (tiny model, rasters)
TINY_CONFIG = """
MODEL:
  META_ARCHITECTURE: "SegCLIP"
  DEVICE: "cpu"
  BACKBONE:
    NAME: "build_clip_resnet_backbone"
  PIXEL_MEAN: [122.7709383, 116.7460125, 104.09373615]
  PIXEL_STD: [68.5005327, 66.6321579, 70.32316305]
  CLIP_RESNET:
    PRETRAINED: ""
  SEGCLIP:
    NUM_QUERIES: 10
    HIDDEN_DIM: 32
    NHEADS: 4
    DIM_FEEDFORWARD: 64
    DEC_LAYERS: 2
    MASK_DIM: 32
    CLASS_HEAD: "{head}"
    TEXT:
      PRETRAINED: ""
    PIXEL_DECODER:
      CONVS_DIM: 32
      ENC_LAYERS: 1
      DIM_FEEDFORWARD: 64
INPUT:
  FORMAT: "RGB"
DATASETS:
  TRAIN: ("synthetic_aerial_train",)
  TEST: ("synthetic_aerial_val",)
"""


def _write_tiny_config(folder: Path, head: str = "linear") -> Path:
    path = Path(folder) / f"tiny_{head}.yaml"
    path.write_text(TINY_CONFIG.replace("{head}", head))
    return path


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_config(folder, head="linear") -> Path``: a tiny SegCLIP config (hidden size 32, two
    decoder layers, 10 queries, random init) written into ``folder``."""
    return _write_tiny_config


@pytest.fixture(scope="session")
def demo():
    """demo/demo.py loaded as a module (``demo.main(argv)`` runs it in-process)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("segclip_demo", REPO_ROOT / "demo" / "demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_geotiff(path: Path, height=100, width=90, nodata_rows=10):
    """A 3-band uint16 GeoTIFF in UTM 33N with a no-data strip on top; returns its transform."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    g = np.random.default_rng(0)
    data = g.integers(200, 3000, size=(3, height, width), dtype=np.uint16)
    data[:, :nodata_rows] = 0
    transform = from_origin(500000.0, 5000000.0, 0.3, 0.3)
    profile = dict(driver="GTiff", height=height, width=width, count=3, dtype="uint16")
    with rasterio.open(path, "w", crs="EPSG:32633", transform=transform, nodata=0, **profile) as ds:
        ds.write(data)
    return transform


@pytest.fixture(scope="session")
def write_geotiff():
    """``write_geotiff(path, height=100, width=90, nodata_rows=10) -> transform``."""
    return _write_geotiff
