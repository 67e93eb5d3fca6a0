"""The GPU machine's offline setup: a folder of wheels filled where PyPI is reachable
(:func:`download_wheels`) and installed from on the GPU machine without an index
(:func:`install_offline`). Called by ``tools/gpu_acceptance.py``; see its docstring.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FOLDER_MB = 40.0
DEFAULT_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")

# What the offline install asks pip for (it resolves their dependencies from the folder and the
# packages already installed).
REQUIREMENTS = [
    "fvcore",
    "iopath",
    "yacs",
    "open_clip_torch",
    "pycocotools",
    "matplotlib",
    "tqdm",
    # detectron2 0.5's runtime needs (tools/install_detectron2.py FALLBACK_RUNTIME_DEPS)
    "termcolor",
    "tabulate",
    "cloudpickle",
    "omegaconf",
    "hydra-core",
]
# Every distribution downloaded: REQUIREMENTS and their dependencies that a CUDA torch install
# with numpy/scipy/opencv/onnxruntime does not already have.
WHEEL_PACKAGES = REQUIREMENTS + [
    "portalocker",
    "pyyaml",
    "ftfy",
    "wcwidth",
    "regex",
    "huggingface_hub",
    "hf-xet",
    "safetensors",
    "timm",
    "requests",
    "urllib3",
    "idna",
    "certifi",
    "charset-normalizer",
    "packaging",
    "contourpy",
    "cycler",
    "fonttools",
    "kiwisolver",
    "pyparsing",
    "python-dateutil",
    "six",
    "antlr4-python3-runtime==4.9.3",  # omegaconf 2.x / hydra-core 1.3 need 4.9.*
]  # pillow (torchvision's), filelock, fsspec and typing_extensions (torch's) are there already
# Published only as sdists (pure Python): downloaded as sdists and built into wheels.
SDIST_ONLY = {"fvcore", "iopath", "antlr4-python3-runtime"}


def _name(spec: str) -> str:
    return re.split(r"[<>=!~ ;]", spec, maxsplit=1)[0].lower()


OPTIONAL_LEFT_OUT = {
    "rasterio": "GeoTIFF reading/writing of the demo (about 20 MB of GDAL): skipped",
    "tensorboard": "event files (training writes metrics.json and curves.png without it)",
}


def _pip(python: str, *args: str) -> None:
    cmd = [python, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd)
    if proc.returncode:
        raise SystemExit(f"gpu_acceptance: pip failed (exit {proc.returncode}): {' '.join(args)}")


def _folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 2**20


def download_wheels(dest: Path, python_version: str, platforms, packages=None) -> list[Path]:
    """Fill ``dest`` (see module doc); returns the files it holds."""
    sys.path.insert(0, str(ROOT / "tools"))
    import install_detectron2

    dest.mkdir(parents=True, exist_ok=True)
    wanted = packages if packages is not None else WHEEL_PACKAGES
    binary = [p for p in wanted if _name(p) not in SDIST_ONLY]
    sdists = [p for p in wanted if _name(p) in SDIST_ONLY]
    py = sys.executable
    abi = "cp" + python_version.replace(".", "")
    if binary:
        tags = []
        for plat in platforms or DEFAULT_PLATFORMS:
            tags += ["--platform", plat]
        # any=pure-Python wheels match every platform: pip accepts them with these tags too
        _pip(py, "download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
             "--python-version", python_version, "--implementation", "cp",
             "--abi", abi, "--abi", "abi3", "--abi", "none", *tags, *binary)  # fmt: skip
    if sdists:
        with tempfile.TemporaryDirectory(prefix="segclip_sdists_") as tmp:
            _pip(py, "download", "--quiet", "--no-deps", "--no-binary=:all:", "--dest", tmp,
                 *sdists)  # fmt: skip
            for sdist in sorted(Path(tmp).iterdir()):
                _pip(py, "wheel", "--quiet", "--no-deps", "--wheel-dir", str(dest), str(sdist))
    if packages is None:
        with tempfile.TemporaryDirectory(prefix="segclip_d2_") as tmp:
            archive = install_detectron2.download_fallback(Path(tmp))
            shutil.copyfile(archive, dest / install_detectron2.FALLBACK_FILE)
    files = sorted(f for f in dest.iterdir() if f.is_file() and f.name != "MANIFEST.txt")
    lines = [f"{f.stat().st_size / 2**20:7.2f} MB  {f.name}" for f in files]
    total = _folder_mb(dest)
    notes = [f"left out: {k} ({v})" for k, v in OPTIONAL_LEFT_OUT.items()]
    (dest / "MANIFEST.txt").write_text(
        f"segclip-d2 wheels for Python {python_version} "
        f"({', '.join(platforms or DEFAULT_PLATFORMS)})\n{total:.1f} MB in {len(files)} files\n"
        + "\n".join(lines + notes)
        + "\n"
    )
    print("\n".join(lines))
    print(f"{dest}: {len(files)} files, {total:.1f} MB (limit {MAX_FOLDER_MB:.0f} MB)")
    for note in notes:
        print(note)
    if total > MAX_FOLDER_MB:
        raise SystemExit(f"gpu_acceptance: {dest} holds {total:.1f} MB > {MAX_FOLDER_MB:.0f} MB")
    return files


def install_offline(python: str, wheels: Path, target: Path | None = None, packages=None) -> None:
    """Install from ``wheels`` without an index (and detectron2 from its sdist there)."""
    extra = ["--target", str(target)] if target is not None else []
    reqs = packages if packages is not None else REQUIREMENTS
    _pip(python, "install", "--quiet", "--no-index", "--find-links", str(wheels), *extra, *reqs)
    if packages is not None:
        return
    sys.path.insert(0, str(ROOT / "tools"))
    import install_detectron2

    archive = wheels / install_detectron2.FALLBACK_FILE
    if not archive.is_file():
        raise SystemExit(f"gpu_acceptance: {archive} is missing (fill the folder again)")
    with tempfile.TemporaryDirectory(prefix="segclip_d2_") as tmp:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        root = Path(tmp) / "detectron2_cdo-0.5"
        install_detectron2.patch_fallback_tree(root)
        _pip(python, "install", "--quiet", "--no-index", "--no-deps", "--no-build-isolation",
             *extra, str(root))  # fmt: skip
