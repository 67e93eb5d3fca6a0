"""Helpers the test files share that must run at import time (fixtures cannot): loading a
repository script as a module, and the error-contract check of a command's stderr."""

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

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


def write_loveda_val(root: Path, names: dict, rng: np.random.Generator, shape=(16, 16)) -> dict:
    """A LoveDA ``Val/`` in the official layout under ``root``: for each ``{domain: name}`` a
    random image and a raw 0..7 mask of ``shape``. Returns ``{(domain, sub): array}``."""
    arrays = {}
    for domain, name in names.items():
        for sub, arr in (
            ("images_png", rng.integers(0, 256, (*shape, 3), dtype=np.uint8)),
            ("masks_png", rng.integers(0, 8, shape).astype(np.uint8)),
        ):
            p = root / "Val" / domain / sub / f"{name}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(p)
            arrays[(domain, sub)] = arr
    return arrays
