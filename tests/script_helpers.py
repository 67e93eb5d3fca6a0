"""Helpers the test files share that must run at import time (fixtures cannot): loading a
repository script as a module, and the error-contract check of a command's stderr."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_script(relative_path: str):
    """The script ``REPO/relative_path`` (``datasets/*.py``, ``tools/*.py``) imported as a
    module named after its file, without running its ``__main__`` block."""
    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_one_error_line(err: str, texts) -> None:
    """``err`` reports the failure as exactly one ``error: ...`` line holding every one of
    ``texts``, and without a traceback."""
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    for text in texts:
        assert text in lines[0], (text, lines[0])
    assert "Traceback" not in err
