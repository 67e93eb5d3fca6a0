"""Test-session settings shared by every test file."""

import os
from pathlib import Path

import pytest

# Tests never reach a model hub: CLIP weights are not downloadable here, models use random init.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real sample data folder (../shared/data); the test is skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample data not found at {SHARED_DATA}")
    return SHARED_DATA
