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
