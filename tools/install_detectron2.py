#!/usr/bin/env python
"""Install detectron2 into the running interpreter's environment.

Order of preference (the first that works wins):

1. an official detectron2 that is already importable: nothing to do;
2. the one the user points to with ``SEGCLIP_DETECTRON2`` (a local checkout directory, or any pip
   requirement spec such as ``detectron2@git+https://...``);
3. the official repository, when the network reaches it (skipped with ``SEGCLIP_OFFLINE=1``);
4. the PyPI fallback ``detectron2-cdo==0.5``: the official v0.5 Python code published without its
   C++ sources. It is downloaded from the package index (checksum pinned), patched so that it
   builds without a compiler and imports on current numpy / Pillow, and installed. Semantic
   segmentation uses none of detectron2's compiled ops; any code that reaches one gets an
   ImportError naming the missing op.

Run it with the interpreter of the environment to install into::

    .venv/bin/python tools/install_detectron2.py

The script is idempotent: a second run finds detectron2 importable and exits in well under a
second.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

OFFICIAL_GIT = "detectron2@git+https://github.com/facebookresearch/detectron2.git"
FALLBACK_NAME = "detectron2-cdo"
FALLBACK_VERSION = "0.5"
FALLBACK_FILE = "detectron2_cdo-0.5.tar.gz"
FALLBACK_SHA256 = "53c9e79e9cc943e80419c588ea44b5479507a8628ed14a4e06bd093e29311b18"
# Runtime requirements of detectron2 0.5 that semantic segmentation needs. The sdist's own list
# pins ``black==21.4b2`` and ``tensorboard``, which are only used by tooling we do not call.
FALLBACK_RUNTIME_DEPS = [
    "Pillow>=7.1",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.6",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "fvcore>=0.1.5",
    "iopath>=0.1.7",
    "omegaconf>=2.1",
    "hydra-core>=1.1",
]

# (pattern, replacement) applied to every .py file of the fallback sdist. They replace aliases
# removed from numpy (1.24) and Pillow (10) with the builtins / constants they always meant.
SOURCE_SUBSTITUTIONS = [
    (re.compile(r"\bnp\.int\b(?!\w)"), "int"),
    (re.compile(r"\bnp\.float\b(?!\w)"), "float"),
    (re.compile(r"\bnp\.str\b(?!\w)"), "str"),
    (re.compile(r"\bnp\.bool\b(?!\w)"), "bool"),
    (re.compile(r"\bnp\.object\b(?!\w)"), "object"),
    (re.compile(r"\bImage\.LINEAR\b"), "Image.BILINEAR"),
]

PLACEHOLDER_C = '''"""Placeholder for detectron2's compiled extension.

Installed by segclip-d2's tools/install_detectron2.py from the detectron2-cdo 0.5 sdist, which
ships without C++ sources. Semantic segmentation needs none of these ops. Reaching one raises
ImportError naming it; install an official detectron2 build to get them.
"""


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise ImportError(
        f"detectron2._C.{name} is not available: this detectron2 is the pure-Python fallback "
        "installed by segclip-d2 (tools/install_detectron2.py). Install an official detectron2 "
        "build (SEGCLIP_DETECTRON2=/path/to/detectron2 make setup) to use compiled ops."
    )
'''


def log(msg: str) -> None:
    print(f"[install_detectron2] {msg}", flush=True)


def importable_detectron2() -> str | None:
    """Return the version of an importable detectron2, or None. Runs in a fresh interpreter so
    that a half-installed package from an earlier attempt in this process cannot fool it."""
    code = "import detectron2, detectron2.config, detectron2.engine; print(detectron2.__version__)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode == 0:
        return res.stdout.strip()
    return None


def pip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", *args]
    log("$ " + " ".join(cmd))
    return subprocess.run(cmd, check=check)


def install_user_choice(spec: str) -> bool:
    path = Path(spec).expanduser()
    target = str(path.resolve()) if path.exists() else spec
    res = pip("install", "--no-build-isolation", target, check=False)
    return res.returncode == 0


def network_reaches(url: str, timeout: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return True
    except OSError:
        return False


def install_official_from_network() -> bool:
    if os.environ.get("SEGCLIP_OFFLINE") == "1":
        log("SEGCLIP_OFFLINE=1: not trying the official repository")
        return False
    if shutil.which("git") is None:
        log("git not found: cannot install the official repository")
        return False
    if not network_reaches("https://github.com/facebookresearch/detectron2"):
        log("the official repository is not reachable from here")
        return False
    res = pip("install", "--no-build-isolation", OFFICIAL_GIT, check=False)
    return res.returncode == 0


def _index_file_url() -> str:
    """Find the fallback sdist's URL on the configured package index (PEP 503 simple page)."""
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    page_url = f"{index}/{FALLBACK_NAME}/"
    with urllib.request.urlopen(page_url, timeout=60) as resp:
        page = resp.read().decode("utf-8", "replace")
    for href in re.findall(r'href="([^"]+)"', page):
        if href.split("#")[0].endswith(FALLBACK_FILE):
            return urllib.request.urljoin(page_url, href.split("#")[0])
    raise RuntimeError(f"{FALLBACK_FILE} is not listed on {page_url}")


def download_fallback(dest: Path) -> Path:
    cache = Path(os.environ.get("SEGCLIP_CACHE", Path.home() / ".cache" / "segclip_d2"))
    cached = cache / FALLBACK_FILE
    if cached.exists() and _sha256(cached) == FALLBACK_SHA256:
        log(f"using cached {cached}")
        return cached
    url = _index_file_url()
    log(f"downloading {url}")
    tmp = dest / (FALLBACK_FILE + ".part")
    with urllib.request.urlopen(url, timeout=300) as resp, open(tmp, "wb") as f:
        shutil.copyfileobj(resp, f)
    digest = _sha256(tmp)
    if digest != FALLBACK_SHA256:
        raise RuntimeError(
            f"checksum mismatch for {url}: got {digest}, expected {FALLBACK_SHA256}; refusing "
            "to install it"
        )
    cache.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tmp, cached.with_suffix(".part"))
    os.replace(cached.with_suffix(".part"), cached)
    return cached


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def patch_fallback_tree(root: Path) -> int:
    """Patch the extracted sdist in place; returns the number of substituted lines."""
    setup_py = root / "setup.py"
    text = setup_py.read_text()
    text, n_ext = re.subn(r"ext_modules=get_extensions\(\),", "ext_modules=[],", text)
    text, n_req = re.subn(
        r"install_requires=\[.*?\n    \],", "install_requires=[],", text, flags=re.S
    )
    if n_ext != 1 or n_req != 1:
        raise RuntimeError(f"unexpected setup.py layout in {setup_py}: the patch did not apply")
    setup_py.write_text(text)
    (root / "detectron2" / "_C.py").write_text(PLACEHOLDER_C)

    changed = 0
    for py in (root / "detectron2").rglob("*.py"):
        lines = py.read_text().splitlines(keepends=True)
        out = []
        for line in lines:
            new = line
            for pat, rep in SOURCE_SUBSTITUTIONS:
                new = pat.sub(rep, new)
            changed += new != line
            out.append(new)
        py.write_text("".join(out))
    return changed


def install_fallback() -> None:
    with tempfile.TemporaryDirectory(prefix="segclip_d2_") as tmpdir:
        tmp = Path(tmpdir)
        archive = download_fallback(tmp)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        root = tmp / "detectron2_cdo-0.5"
        n = patch_fallback_tree(root)
        log(f"patched {n} lines of the detectron2 0.5 sources for numpy 2 / Pillow 10+")
        pip("install", "--quiet", *FALLBACK_RUNTIME_DEPS)
        pip("install", "--quiet", "--no-deps", "--no-build-isolation", str(root))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--force-fallback",
        action="store_true",
        help="skip options 2 and 3 (used by tests of the fallback path)",
    )
    args = parser.parse_args()

    version = importable_detectron2()
    if version is not None:
        log(f"detectron2 {version} is already importable: nothing to do")
        return 0

    user_spec = os.environ.get("SEGCLIP_DETECTRON2")
    if user_spec and not args.force_fallback:
        log(f"installing detectron2 from SEGCLIP_DETECTRON2={user_spec}")
        if not install_user_choice(user_spec):
            log(f"installing {user_spec} failed; fix it or unset SEGCLIP_DETECTRON2")
            return 1
    elif args.force_fallback or not install_official_from_network():
        log(f"installing the PyPI fallback {FALLBACK_NAME}=={FALLBACK_VERSION}")
        install_fallback()

    version = importable_detectron2()
    if version is None:
        log("detectron2 still does not import after installation")
        return 1
    log(f"detectron2 {version} installed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
