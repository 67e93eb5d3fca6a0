"""Entry points start without the dependency warnings users can do nothing about, and nothing
else is hidden."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEPRECATION = "`torch.jit.script` is deprecated"


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def test_import_is_quiet_and_other_warnings_still_show(tmp_path):
    """fvcore and detectron2 call torch.jit.script when imported; after ``import segclip_d2``
    nothing was printed, while an unrelated FutureWarning and the user's own torch.jit.script
    call are still reported."""
    script = tmp_path / "entry.py"
    script.write_text(
        "import sys\n"
        "import warnings\n"
        "import segclip_d2\n"
        "import segclip_d2.modeling\n"
        "print('IMPORTED', file=sys.stderr, flush=True)\n"
        "warnings.warn('an unrelated FutureWarning', FutureWarning)\n"
        "import torch\n"
        "def add_one(x: torch.Tensor) -> torch.Tensor:\n"
        "    return x + 1\n"
        "torch.jit.script(add_one)  # the user's own call: still warned about\n"
    )
    proc = _run([str(script)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    at_import, _, after = proc.stderr.partition("IMPORTED")
    if DEPRECATION not in after:
        pytest.skip("this torch does not deprecate torch.jit.script: nothing to silence")
    assert "Warning" not in at_import, at_import
    assert "FutureWarning: an unrelated FutureWarning" in after


def test_train_net_starts_without_warnings():
    """train_net.py imports segclip_d2 before detectron2 (the demo, tools and dataset scripts
    import segclip_d2 before anything that reaches detectron2 too)."""
    proc = _run(["train_net.py", "--help"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Warning" not in proc.stderr, proc.stderr
