"""Benchmark of multi-scale deformable attention: PyTorch reference vs compiled CPU kernel.

Shapes follow the pixel decoder on an input of SIZE x SIZE: levels at strides 8/16/32, 8 heads x
32 channels, 4 points, one query per token of all levels (B=1). Sampling is pixel-decoder-like:
each query samples near its own position (head-wise ring of 1..P pixels plus ~2 px noise), not
uniformly over the map.

    .venv/bin/python tools/benchmark_msda.py                 # 512 and 1024, 2 threads
    .venv/bin/python tools/benchmark_msda.py --sizes 1024 --repeats 7

Each (size, pass, implementation) runs in its own subprocess. Times are the median of
``--repeats`` runs after one warm-up. "peak MB" is the increase of the process's peak resident
set size (getrusage ru_maxrss) from after the inputs were built to after the timed runs: the
extra host memory the op needed at its peak (outputs, intermediates, gradients, allocator
caches), not an exact allocation count.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

STRIDES = (8, 16, 32)
N_HEADS, HEAD_DIM, N_POINTS = 8, 32, 4


def make_inputs(size: int, seed: int = 0):
    """Pixel-decoder-like inputs for a SIZE x SIZE image (B=1, queries = all tokens)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor([[size // s, size // s] for s in STRIDES], dtype=torch.long)
    areas = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S = int(areas.sum())
    L, H, P = len(STRIDES), N_HEADS, N_POINTS
    value = torch.randn(1, S, H, HEAD_DIM, generator=g)

    # reference point of every token: its own pixel centre, normalised (x, y)
    refs = []
    for h_l, w_l in shapes.tolist():
        ys, xs = torch.meshgrid(
            (torch.arange(h_l) + 0.5) / h_l, (torch.arange(w_l) + 0.5) / w_l, indexing="ij"
        )
        refs.append(torch.stack([xs, ys], -1).reshape(-1, 2))
    ref = torch.cat(refs)[None, :, None, None, None, :]  # (1, Q, 1, 1, 1, 2)

    # offsets in pixels of each level: head direction * (1..P) + N(0, 2 px)
    angles = torch.arange(H) * (2 * torch.pi / H)
    dirs = torch.stack([angles.cos(), angles.sin()], -1)  # (H, 2)
    ring = dirs[:, None, None, :] * torch.arange(1, P + 1).view(1, 1, P, 1)  # (H, 1, P, 2)
    offsets = ring[None, None] + 2.0 * torch.randn(1, S, H, L, P, 2, generator=g)
    wh = torch.stack([shapes[:, 1], shapes[:, 0]], -1).float()  # (L, 2) as (W, H)
    loc = ref + offsets / wh[None, None, None, :, None, :]  # (1, Q, H, L, P, 2)
    attn = torch.randn(1, S, H, L * P, generator=g).softmax(-1).view(1, S, H, L, P)
    return value, shapes, starts, loc.contiguous(), attn


def worker(size: int, mode: str, impl: str, repeats: int, threads: int) -> dict:
    import torch

    from segclip_d2.layers.ms_deform_attn import ms_deform_attn

    torch.set_num_threads(threads)
    value, shapes, starts, loc, attn = make_inputs(size)
    backward = mode == "fwd+bwd"
    if backward:
        for t in (value, loc, attn):
            t.requires_grad_(True)
    grad = torch.randn(1, loc.shape[1], N_HEADS * HEAD_DIM)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

    def run():
        if backward:
            out = ms_deform_attn(value, shapes, starts, loc, attn, impl=impl)
            torch.autograd.grad(out, (value, loc, attn), grad)
        else:
            with torch.no_grad():
                ms_deform_attn(value, shapes, starts, loc, attn, impl=impl)

    run()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "peak_mb": (rss1 - rss0) / 1024.0,
    }


def main(argv=None) -> None:
    from segclip_d2.errors import ArgumentParser, UserError

    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--worker", nargs=3, metavar=("SIZE", "MODE", "IMPL"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1 or min(args.sizes) < 32:
        raise UserError("--repeats/--threads/--sizes", "must be >= 1 (sizes >= 32)", None)

    if args.worker:
        size, mode, impl = args.worker
        print(json.dumps(worker(int(size), mode, impl, args.repeats, args.threads)))
        return

    from segclip_d2.layers.ms_deform_attn import extension_available

    if not extension_available():
        raise UserError(
            "segclip_d2._C",
            "the compiled op is not built",
            "run `.venv/bin/pip install --no-build-isolation -e .`",
        )
    root = Path(__file__).resolve().parents[1]
    rows = []
    for size in args.sizes:
        for mode in ("fwd", "fwd+bwd"):
            res = {}
            for impl in ("pytorch", "cpp"):
                cmd = [sys.executable, __file__, "--worker", str(size), mode, impl]
                cmd += ["--repeats", str(args.repeats), "--threads", str(args.threads)]
                proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    sys.exit(f"worker {size} {mode} {impl} failed:\n{proc.stderr}")
                res[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append((size, mode, res))

    print(
        f"MSDeformAttn CPU benchmark: {args.threads} threads, B=1, H={N_HEADS}, Dh={HEAD_DIM}, "
        f"L={len(STRIDES)} (strides {'/'.join(map(str, STRIDES))}), P={N_POINTS}, "
        f"median of {args.repeats}"
    )
    header = (
        f"{'input':>9} {'queries':>8} {'pass':>8} {'ref ms':>9} {'cpp ms':>9} {'speed-up':>9} "
        f"{'ref peak MB':>12} {'cpp peak MB':>12}"
    )
    print(header)
    print("-" * len(header))
    for size, mode, res in rows:
        queries = sum((size // s) ** 2 for s in STRIDES)
        ref, cpp = res["pytorch"], res["cpp"]
        print(
            f"{size:>4}x{size:<4} {queries:>8} {mode:>8} {ref['median_ms']:>9.1f} "
            f"{cpp['median_ms']:>9.1f} {ref['median_ms'] / cpp['median_ms']:>8.1f}x "
            f"{ref['peak_mb']:>12.1f} {cpp['peak_mb']:>12.1f}"
        )


if __name__ == "__main__":
    from segclip_d2.errors import run_main

    sys.exit(run_main(main))
