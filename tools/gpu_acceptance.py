#!/usr/bin/env python3
"""GPU acceptance check: set up segclip-d2 on a (possibly offline) GPU machine and check it.

    tools/gpu_acceptance.sh --download-wheels DIR --python-version 3.12   # where PyPI is reachable
    PYTHON=python3 tools/gpu_acceptance.sh --wheels DIR                   # on the GPU machine
    make gpu-check WHEELS=DIR

On the GPU machine it uses the interpreter it is given (``PYTHON``, default ``python3``) and its
CUDA torch; it never creates a venv and never reaches the network. Steps:

1. exit at once (status 2, one message) when that interpreter sees no CUDA GPU;
2. with ``--wheels DIR``: install the project's missing dependencies from DIR offline
   (``pip --no-index --find-links DIR``), and detectron2 from the fallback sdist in DIR (patched
   and installed as ``tools/install_detectron2.py`` does);
3. build the deformable-attention op with its CUDA kernels in place (``FORCE_CUDA=1``);
4. run the checks and print a table (check | result | measured | tolerance or target); the exit
   status is 1 when any check fails.

Checks: the CUDA op against the CPU op and the PyTorch reference (forward and backward, fp32 /
fp16 / bf16, R50 1024 shapes and odd sizes); 100 iterations of the synthetic config under fp16
AMP (loss falls, finite, few skipped scaler steps); with 2+ GPUs, DDP after 3 iterations against
one GPU on the same global batch; R50 training speed and peak memory at batch 2/4, 512 crops;
inference latency and peak memory at 512/1024/2048, whole and slide, fp32/fp16/bf16.

``--download-wheels DIR --python-version X.Y`` fills DIR for the target's Python and platform
(``--platform``, default manylinux x86_64): wheels of every dependency the GPU machine lacks
(torch, torchvision, numpy, scipy, opencv and onnxruntime are expected there), pure-Python sdists
built into wheels, and the detectron2 fallback sdist (checksum pinned). It must stay under 40 MB;
``DIR/MANIFEST.txt`` lists what it holds. Optional packages (rasterio: GeoTIFF I/O; tensorboard:
event files) are left out; the parts that need them are skipped.

The parts live in ``tools/gpu_wheels.py`` (download, offline install) and ``tools/gpu_checks.py``
(the checks and their table, run in a fresh process after the build).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_checks import CHECKS  # noqa: E402
from gpu_wheels import DEFAULT_PLATFORMS, download_wheels, install_offline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NO_GPU_EXIT = 2


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tools/gpu_acceptance.sh", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--wheels", type=Path, help="folder of wheels to install from, offline")
    parser.add_argument(
        "--download-wheels", type=Path, metavar="DIR", help="fill DIR for the target machine"
    )
    parser.add_argument("--python-version", help="target Python for --download-wheels, e.g. 3.12")
    parser.add_argument(
        "--platform",
        action="append",
        help=f"target platform tag for --download-wheels (default {', '.join(DEFAULT_PLATFORMS)})",
    )
    parser.add_argument(
        "--packages", help=argparse.SUPPRESS
    )  # comma-separated subset (tests of the download / install steps)
    parser.add_argument(
        "--install-target", type=Path, help=argparse.SUPPRESS
    )  # pip --target for the offline install (tests)
    parser.add_argument("--skip-build", action="store_true", help="do not rebuild the CUDA op")
    parser.add_argument(
        "--checks",
        default="op,amp100,ddp,train_speed,inference",
        help="comma-separated checks to run (default all)",
    )
    args = parser.parse_args(argv)
    if args.download_wheels and args.wheels:
        parser.error("--download-wheels and --wheels are separate steps: give one of them")
    if args.python_version and not args.download_wheels:
        parser.error("--python-version only applies to --download-wheels")
    if args.download_wheels:
        if not args.python_version:
            parser.error("--download-wheels needs --python-version (the GPU machine's, e.g. 3.12)")
        if not re.fullmatch(r"3\.\d{1,2}", args.python_version):
            parser.error(f"--python-version {args.python_version!r}: expected 3.X, e.g. 3.12")
    if args.wheels is not None and not args.wheels.is_dir():
        parser.error(f"--wheels {args.wheels}: no such folder")
    unknown = set(args.checks.split(",")) - set(CHECKS)
    if unknown:
        parser.error(f"--checks: unknown {', '.join(sorted(unknown))}; choose from {CHECKS}")
    return args


def nvidia_device_present() -> bool:
    """An NVIDIA driver exposes a GPU (device node or /proc entry): checked before torch is
    imported, so a machine without a GPU is told so at once."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return any(Path("/dev").glob("nvidia[0-9]*")) or (gpus.is_dir() and any(gpus.iterdir()))


def probe_gpus(python: str) -> tuple[int, str]:
    """(number of CUDA GPUs the interpreter sees, a description)."""
    code = (
        "import json, torch\n"
        "n = torch.cuda.device_count() if torch.cuda.is_available() else 0\n"
        "print(json.dumps({'n': n, 'torch': torch.__version__, 'cuda': torch.version.cuda,"
        " 'names': [torch.cuda.get_device_name(i) for i in range(n)]}))\n"
    )
    try:
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return 0, f"{python} could not be run ({e})"
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return 0, f"{python} cannot import torch ({last})"
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    desc = f"torch {info['torch']} (CUDA {info['cuda']})"
    if info["n"]:
        desc += ": " + ", ".join(info["names"])
    return info["n"], desc


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.download_wheels:
        packages = args.packages.split(",") if args.packages else None
        download_wheels(args.download_wheels, args.python_version, args.platform, packages)
        return 0
    python = os.environ.get("PYTHON", "python3")
    if nvidia_device_present():
        num_gpus, desc = probe_gpus(python)
    else:
        num_gpus, desc = 0, "no NVIDIA device in /dev or /proc/driver/nvidia"
    if num_gpus == 0 and args.install_target is None:
        print(
            f"gpu_acceptance: no CUDA GPU visible to {python} ({desc}). This check needs a "
            "machine with an NVIDIA GPU and a CUDA build of torch; nothing was run.",
            file=sys.stderr,
        )
        return NO_GPU_EXIT
    print(f"gpu_acceptance: {python}: {desc}", flush=True)
    start = time.perf_counter()
    if args.wheels:
        packages = args.packages.split(",") if args.packages else None
        install_offline(python, args.wheels, args.install_target, packages)
        if args.install_target is not None:
            return 0  # install-only (tests)
    if not args.skip_build:
        env = dict(os.environ, FORCE_CUDA="1")
        cmd = [python, "setup.py", "-q", "build_ext", "--inplace"]
        print("+", " ".join(cmd), flush=True)
        if subprocess.run(cmd, cwd=ROOT, env=env).returncode:
            print("gpu_acceptance: building the CUDA op failed (see above)", file=sys.stderr)
            return 1
    print(f"gpu_acceptance: setup took {time.perf_counter() - start:.0f} s", flush=True)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [python, str(ROOT / "tools" / "gpu_checks.py"), "--checks", args.checks]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
