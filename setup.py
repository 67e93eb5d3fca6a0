"""Build of the compiled ops ``segclip_d2._C`` (complements pyproject.toml, which holds metadata).

    .venv/bin/pip install --no-build-isolation -e .     # or: make setup

builds the CPU extension in place (``segclip_d2/_C*.so``). The CUDA kernels are added when a CUDA
toolkit is found and either ``torch.cuda.is_available()`` or ``FORCE_CUDA=1``; the define
``WITH_CUDA`` then enables them. ``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures
(e.g. "8.0;9.0"). ``SEGCLIP_NO_EXT=1`` skips the extension (pure-Python install; the ops then
use their PyTorch reference).

Environment fix-ups done here, before torch.utils.cpp_extension is imported (it reads CUDA_HOME
at import time):
* CUDA_HOME must name the toolkit root. torch guesses it from the folder of ``nvcc``, which is
  wrong when ``nvcc`` is a wrapper script (e.g. /usr/local/bin/nvcc); we resolve the real root.
* ATen's CUDA headers include cusparse.h, which pip-installed CUDA wheels ship in
  site-packages/nvidia/cu13/include (or nvidia/cusparse/include); that folder is appended to
  CPATH (after the toolkit's own include directory).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import site
import sys
import sysconfig
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
# Oldest torch supported (as in pyproject.toml's dependencies).
TORCH_FLOOR = (2, 11)
CSRC = Path("segclip_d2") / "layers" / "csrc"


def _is_cuda_root(path: str | os.PathLike | None) -> bool:
    return (
        bool(path)
        and (Path(path) / "include" / "cuda_runtime.h").is_file()
        and (Path(path) / "bin" / "nvcc").is_file()
    )


def _find_cuda_root() -> str | None:
    """Toolkit root from CUDA_HOME/CUDA_PATH, the real nvcc on PATH, or /usr/local/cuda*."""
    for key in ("CUDA_HOME", "CUDA_PATH"):
        if _is_cuda_root(os.environ.get(key)):
            return os.environ[key]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(os.path.realpath(nvcc))
        if _is_cuda_root(real.parent.parent):
            return str(real.parent.parent)
        # A wrapper script: look for the absolute path of the nvcc it runs.
        try:
            text = real.read_text(errors="ignore")[:4096]
        except OSError:
            text = ""
        for match in re.findall(r"(/[^\s\"']+)/bin/nvcc", text):
            if _is_cuda_root(match):
                return match
    for candidate in ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]:
        if _is_cuda_root(candidate):
            return os.path.realpath(candidate)
    return None


def _wheel_cuda_include_dirs() -> list[str]:
    """Header folders of pip-installed NVIDIA wheels holding cusparse.h."""
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    roots.update(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
    found = []
    for root in sorted(roots):
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include", "nvidia/cusparse/include"):
            d = Path(root) / sub
            if (d / "cusparse.h").is_file() and str(d) not in found:
                found.append(str(d))
    return found


def _want_extension() -> bool:
    return os.environ.get("SEGCLIP_NO_EXT", "0") in ("", "0")


def _build_ext_modules():
    cuda_root = _find_cuda_root()
    if cuda_root:
        os.environ["CUDA_HOME"] = cuda_root  # before importing torch.utils.cpp_extension
        extra = _wheel_cuda_include_dirs()
        if extra:
            parts = [p for p in os.environ.get("CPATH", "").split(os.pathsep) if p]
            os.environ["CPATH"] = os.pathsep.join(parts + [d for d in extra if d not in parts])

    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    found = tuple(int(p) for p in re.findall(r"\d+", torch.__version__)[:2])
    if found < TORCH_FLOOR:
        raise RuntimeError(
            f"segclip_d2._C needs torch >= {'.'.join(map(str, TORCH_FLOOR))} (the op is a "
            f"torch.library operator); this environment has torch {torch.__version__}"
        )

    force_cuda = os.environ.get("FORCE_CUDA", "0") not in ("", "0")
    with_cuda = cuda_root is not None and (torch.cuda.is_available() or force_cuda)
    if force_cuda and cuda_root is None:
        raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit found (set CUDA_HOME to its root)")

    sources = [str(CSRC / "bindings.cpp"), str(CSRC / "ms_deform_attn_cpu.cpp")]
    # -ffp-contract=fast: let a*b+c become one FMA (ISO -std=c++20 turns contraction off).
    cxx_flags = ["-O3", "-ffp-contract=fast"]
    # This torch build implements ATen's header-only at::parallel_for with OpenMP: without
    # -fopenmp it would silently run on one thread. (Our sources contain no OpenMP pragmas; the
    # runtime is the libgomp already loaded by torch.)
    parallel_info = torch.__config__.parallel_info()
    openmp = "parallel backend: OpenMP" in parallel_info and sys.platform.startswith("linux")
    if openmp:
        cxx_flags.append("-fopenmp")
    define_macros = []
    kwargs = {}
    if with_cuda:
        sources.append(str(CSRC / "cuda" / "ms_deform_attn_cuda.cu"))
        define_macros.append(("WITH_CUDA", None))
        ext_cls = CUDAExtension
        kwargs["extra_compile_args"] = {
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-DWITH_CUDA"],
        }
        print(f"segclip_d2._C: building CPU + CUDA kernels (CUDA_HOME={cuda_root})")
    else:
        ext_cls = CppExtension
        kwargs["extra_compile_args"] = {"cxx": cxx_flags}
        print(f"segclip_d2._C: building CPU kernels only (CUDA toolkit: {cuda_root})")
    if openmp:
        kwargs["extra_link_args"] = ["-fopenmp"]

    ext = ext_cls(
        name="segclip_d2._C",
        sources=sources,
        include_dirs=[str(ROOT / CSRC)],
        define_macros=define_macros,
        **kwargs,
    )
    return [ext], {"build_ext": BuildExtension}


if _want_extension():
    ext_modules, cmdclass = _build_ext_modules()
else:
    ext_modules, cmdclass = [], {}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
