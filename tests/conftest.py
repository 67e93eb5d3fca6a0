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


def _logger_state(logger) -> tuple:
    return list(logger.handlers), logger.propagate, logger.level


def _stream(handler):
    return getattr(handler, "stream", None)


@pytest.fixture
def tiny_training(tmp_path, monkeypatch):
    """train_net.py arguments for a tiny CPU training (seconds per iteration) on a 4-train /
    2-val synthetic set of 64 px tiles in ``tmp_path/datasets``: ``(argv, output_dir)``; add
    ``SOLVER.MAX_ITER`` and other overrides after ``argv``, flags at ``argv[2:2]``."""
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    for key, value in (("NUM_TRAIN", "4"), ("NUM_VAL", "2"), ("SIZE", "64")):
        monkeypatch.setenv(f"SEGCLIP_SYNTHETIC_{key}", value)
    out = tmp_path / "out"
    model = {"NUM_QUERIES": 10, "HIDDEN_DIM": 32, "NHEADS": 2, "DIM_FEEDFORWARD": 64}
    model.update({"DEC_LAYERS": 2, "MASK_DIM": 32, "LOSS.TRAIN_NUM_POINTS": 256})
    model.update({"PIXEL_DECODER.CONVS_DIM": 32, "PIXEL_DECODER.ENC_LAYERS": 1})
    model["PIXEL_DECODER.DIM_FEEDFORWARD"] = 64
    argv = ["--config-file", str(REPO_ROOT / "configs" / "synthetic" / "segclip_cpu.yaml")]
    for key, value in model.items():
        argv += [f"MODEL.SEGCLIP.{key}", str(value)]
    argv += ["INPUT.CROP.SIZE", "(64, 64)", "INPUT.RESIZE_SCALE", "(1.0, 1.0)"]
    argv += ["INPUT.COLOR_AUG", "False", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "0"]
    argv += ["DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", "()", "TEST.EVAL_PERIOD", "0"]
    argv += ["SEED", "7", "OUTPUT_DIR", str(out)]
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one thread is several times faster than two
    yield argv, out
    torch.set_num_threads(threads)


_LOGGERS = ("", "segclip_d2", "detectron2", "d2", "fvcore")


@pytest.fixture(autouse=True)
def isolated_loggers():
    """Every test starts and ends with the loggers as they were: an entry point run in-process
    (train_net's detectron2 setup_logger) attaches handlers to the test's captured stderr, which
    is closed after the test; a later run writing to it prints "Logging error" tracebacks."""
    import logging

    saved = {n: _logger_state(logging.getLogger(n)) for n in _LOGGERS}
    for n in _LOGGERS:  # handlers left by earlier runs may write to a closed (captured) stream
        lg = logging.getLogger(n)
        lg.handlers = [h for h in lg.handlers if not getattr(_stream(h), "closed", False)]
    _clear_setup_logger_cache()
    yield
    for n in _LOGGERS:
        lg = logging.getLogger(n)
        lg.handlers, lg.propagate, lg.level = saved[n]
    _clear_setup_logger_cache()


def _clear_setup_logger_cache() -> None:
    """detectron2's setup_logger caches the loggers it set up: the next run sets up its own."""
    import sys

    logger_module = sys.modules.get("detectron2.utils.logger")
    if logger_module is not None:
        logger_module.setup_logger.cache_clear()


def _package_index_reachable() -> tuple[bool, str]:
    """Whether pip's package index (PIP_INDEX_URL, else pypi.org; through HTTPS_PROXY when
    set) accepts a connection within 5 s."""
    import socket
    from urllib.parse import urlparse

    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple")
    host, port = url.hostname or "pypi.org", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as e:
        return False, f"{host}:{port} unreachable ({e})"
    return True, ""


@pytest.fixture(autouse=True)
def _skip_network_tests_offline(request):
    """Tests marked ``network`` (they download from the package index) are skipped, with the
    reason, when the index cannot be reached (or SEGCLIP_OFFLINE=1)."""
    if request.node.get_closest_marker("network") is None:
        return
    if os.environ.get("SEGCLIP_OFFLINE", "") not in ("", "0"):
        pytest.skip("needs the package index (network); SEGCLIP_OFFLINE is set")
    ok, why = _package_index_reachable()
    if not ok:
        pytest.skip(f"needs the package index (network): {why}")
