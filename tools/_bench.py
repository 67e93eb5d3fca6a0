"""Shared parts of the inference benchmarks (``tools/benchmark_*.py``, ``tools/bench_case.py``):
test images, child processes with their own peak memory, the models they time.

Models are built by the project's one loader (:func:`segclip_d2.predict.load.load_model`), so a
benchmark reads configs and checkpoints exactly as the demo and evaluation do.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SMALL_CONFIG = REPO / "configs" / "synthetic" / "segclip_cpu.yaml"
R50_CONFIG = REPO / "configs" / "loveda" / "segclip_R50.yaml"
SHARED_DATA = Path(os.environ.get("SEGCLIP_SHARED_DATA", REPO.parent / "shared" / "data"))
REAL_TILES = SHARED_DATA / "loveda" / "images"
# Random init, no weight lookups, CPU (the configs default to CUDA).
OFFLINE_OPTS = [
    "MODEL.SEGCLIP.TEXT.PRETRAINED",
    "",
    "MODEL.CLIP_RESNET.PRETRAINED",
    "",
    "MODEL.DEVICE",
    "cpu",
]


def run_child(argv: list[str], timeout: float = 900) -> tuple[int, float, float, str]:
    """Run ``argv``; return (exit code, wall seconds, peak RSS in MiB of that process, stdout)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    with tempfile.TemporaryFile("w+") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        text = out.read()
    return proc.returncode, wall, usage.ru_maxrss / 1024.0, text


def child_json(text: str) -> dict:
    """The last ``RESULT {json}`` line a child printed."""
    for line in reversed(text.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError("child printed no result:\n" + text[-3000:])


def emit(result: dict) -> None:
    """Print ``result`` (plus this process's peak RSS) as the ``RESULT {json}`` line."""
    result["self_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print("RESULT " + json.dumps(result), flush=True)


def case_argv(case: str, config, size=0, opts=(), threads=2, extra=()) -> list[str]:
    """Command line of one ``tools/bench_case.py`` run."""
    return [
        sys.executable,
        str(REPO / "tools" / "bench_case.py"),
        case,
        "--config",
        str(config),
        "--size",
        str(size),
        "--threads",
        str(threads),
        *extra,
        "--opts",
        *opts,
    ]


def fmt_row(cols, widths):
    return "  ".join(str(c).ljust(w) for c, w in zip(cols, widths))


def load_model(config: str, opts: list[str], optimize: bool = True):
    """The benchmarked model through the project's loader (random init allowed: the caller
    checked the weights); ``optimize`` unless SEGCLIP_PLAIN_MODEL=1. Returns (cfg, model, a
    SegInferencer of cfg)."""
    from segclip_d2.predict import SegInferencer
    from segclip_d2.predict.load import load_model as load

    plain = os.environ.get("SEGCLIP_PLAIN_MODEL", "0") not in ("", "0")
    cfg, model = load(
        config, opts=OFFLINE_OPTS + list(opts), device=None, precision=None,
        optimize=optimize and not plain, allow_random_weights=True,
    )  # fmt: skip
    return cfg, model, SegInferencer(cfg)


def test_image(size: int, seed: int = 0):
    """A real LoveDA tile resized to ``size`` when available, else smooth random noise:
    (3, size, size) float tensor."""
    import torch

    return torch.from_numpy(test_image_rgb(size, seed)).permute(2, 0, 1).float()


def test_image_rgb(size: int, seed: int = 0):
    """:func:`test_image` as a (size, size, 3) uint8 RGB array (no torch import)."""
    import cv2
    import numpy as np

    tiles = sorted(REAL_TILES.glob("*.png")) if REAL_TILES.is_dir() else []
    if tiles:
        rgb = cv2.imread(str(tiles[seed % len(tiles)]))[:, :, ::-1]
        rgb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_LINEAR)
    else:
        g = np.random.default_rng(seed)
        rgb = cv2.resize(
            g.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8), (size, size)
        )
    return np.ascontiguousarray(rgb)


def check_weights_opts(opts: list[str], allow_random: bool) -> None:
    """Before any child starts: ``--opts`` pairs, and MODEL.WEIGHTS a local file (or random
    weights allowed); a :class:`~segclip_d2.errors.UserError` otherwise."""
    from segclip_d2.errors import UserError, check_trained_weights, check_weights_file

    if len(opts) % 2:
        raise UserError("--opts", "odd number of items: each KEY needs a VALUE", None)
    weights = str(dict(zip(opts[::2], opts[1::2])).get("MODEL.WEIGHTS", ""))
    if "://" in weights:
        raise UserError(
            f"--opts MODEL.WEIGHTS {weights}",
            "remote weights are not fetched here",
            "download the checkpoint and pass its local path",
        )
    check_weights_file(weights, "--opts MODEL.WEIGHTS")
    check_trained_weights(weights, allow_random)


def add_common_arguments(p, config_help: str) -> None:
    """--config, --threads, --repeats, --allow-random-weights and --opts."""
    import argparse

    p.add_argument("--config", default=None, help=config_help)
    p.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per case (1)")
    p.add_argument(
        "--allow-random-weights",
        action="store_true",
        help="measure a randomly initialised model (speed is the same; agreement figures are "
        "then meaningless) when --opts gives no MODEL.WEIGHTS",
    )
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config KEY VALUE pairs")


def bench_main(argv, doc: str, config_help: str, add_arguments, run) -> int:
    """A benchmark's command line under the error contract (a user error is one line, exit 2):
    its docstring as the help text, :func:`add_common_arguments` then ``add_arguments(parser)``,
    the weights options checked, then ``run(args)``."""
    import argparse

    from segclip_d2.errors import ArgumentParser, run_main

    def cli(argv=None) -> int:
        p = ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
        add_common_arguments(p, config_help)
        add_arguments(p)
        args = p.parse_args(argv)
        check_weights_opts(args.opts, args.allow_random_weights)
        run(args)
        return 0

    return run_main(cli, argv)


def add_num_tiles_argument(p) -> None:
    p.add_argument("--num-tiles", type=int, default=2, help="real tiles timed (2)")
