"""The detectron2 fallback installer's patch step, on a small tree shaped like the v0.5 sdist."""

import importlib.util
import sys
from pathlib import Path

import pytest
from script_helpers import load_script

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installer():
    return load_script("tools/install_detectron2.py")


SETUP_PY = """
setup(
    name="detectron2_cdo",
    install_requires=[
        "Pillow>=7.1",
        "black==21.4b2",
    ],
    ext_modules=get_extensions(),
    cmdclass={"build_ext": torch.utils.cpp_extension.BuildExtension},
)
"""

EVAL_PY = """import numpy as np
from PIL import Image
pred = np.array(output, dtype=np.int)
acc = np.full(3, np.nan, dtype=np.float)
names = np.array(["a"], dtype=np.str)
keep = np.int64(3)  # must stay
np.interp_value = np.float32(1.0)  # must stay
t = Image.LINEAR
"""


def _fake_sdist(root: Path) -> Path:
    (root / "detectron2" / "evaluation").mkdir(parents=True)
    (root / "setup.py").write_text(SETUP_PY)
    (root / "detectron2" / "evaluation" / "sem_seg_evaluation.py").write_text(EVAL_PY)
    return root


def test_patch_rewrites_removed_aliases_and_drops_extension(installer, tmp_path):
    root = _fake_sdist(tmp_path / "detectron2_cdo-0.5")
    changed = installer.patch_fallback_tree(root)
    assert changed == 4
    text = (root / "detectron2" / "evaluation" / "sem_seg_evaluation.py").read_text()
    assert "dtype=int)" in text and "dtype=float)" in text and "dtype=str)" in text
    assert "np.int64(3)" in text and "np.float32(1.0)" in text
    assert "Image.BILINEAR" in text and "Image.LINEAR" not in text
    setup_text = (root / "setup.py").read_text()
    assert "ext_modules=[]," in setup_text and "black" not in setup_text
    # The placeholder extension raises a clear ImportError naming the missing op.
    sys.modules.pop("_C", None)
    spec = importlib.util.spec_from_file_location("_C", root / "detectron2" / "_C.py")
    placeholder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(placeholder)
    with pytest.raises(ImportError, match=r"detectron2\._C\.nms_rotated is not available"):
        placeholder.nms_rotated  # noqa: B018


def test_patch_refuses_an_unexpected_layout(installer, tmp_path):
    root = _fake_sdist(tmp_path / "other")
    (root / "setup.py").write_text("setup(name='x')\n")
    with pytest.raises(RuntimeError, match="the patch did not apply"):
        installer.patch_fallback_tree(root)


def test_detectron2_in_this_environment_imports_what_we_use():
    import detectron2
    from detectron2.config import get_cfg
    from detectron2.engine import DefaultTrainer  # noqa: F401
    from detectron2.evaluation import DatasetEvaluator  # noqa: F401

    assert get_cfg().MODEL.META_ARCHITECTURE
    assert detectron2.__version__
