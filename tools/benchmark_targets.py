#!/usr/bin/env python
"""The inference speed and agreement targets on real 1024x1024 LoveDA tiles: the fast path
against the baseline (PyTorch deformable attention + full-resolution post-processing), low vs
full post-processing, bf16 vs fp32. Every variant runs in its own process
(``tools/bench_case.py tiles``); the agreement figures compare their saved probabilities.

    python tools/benchmark_targets.py --allow-random-weights          # R50 LoveDA config
    python tools/benchmark_targets.py --config configs/synthetic/segclip_cpu.yaml \
        --opts MODEL.WEIGHTS output/synthetic_cpu/model_final.pth

Agreement figures of a random model are meaningless. Nothing here is part of the test suite.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import (  # noqa: E402
    R50_CONFIG,
    REAL_TILES,
    add_num_tiles_argument,
    bench_main,
    case_argv,
    child_json,
    run_child,
)


def mode_targets(args) -> None:
    import numpy as np

    config = args.config or str(R50_CONFIG)
    variants = [
        ("fast (MSDA auto, POSTPROCESS low, fp32)", []),
        (
            "baseline (MSDA pytorch, POSTPROCESS full, fp32)",
            ["MODEL.SEGCLIP.MSDA_IMPL", "pytorch", "MODEL.SEGCLIP.POSTPROCESS", "full"],
        ),
        ("fast, POSTPROCESS full (agreement reference)", ["MODEL.SEGCLIP.POSTPROCESS", "full"]),
        ("fast + bf16 autocast", ["TEST.PRECISION", "bf16"]),
    ]
    if not REAL_TILES.is_dir():
        print(f"real tiles not found at {REAL_TILES}: targets need them")
        return
    results = {}
    tmp = Path(tempfile.mkdtemp(prefix="segclip_bench_"))
    print(
        f"\n== targets, {Path(config).name}, 1024x1024 LoveDA tiles, CPU {args.threads} threads =="
    )
    for i, (name, opts) in enumerate(variants):
        save = tmp / f"v{i}.npy"
        argv = case_argv(
            "tiles",
            config,
            1024,
            opts + list(args.opts),
            args.threads,
            ["--save", str(save), "--num-tiles", str(args.num_tiles)],
        )
        code, wall, rss, text = run_child(argv, timeout=1800)
        if code:
            print(f"{name}: FAILED\n{text[-3000:]}")
            continue
        r = child_json(text)
        results[i] = (r, np.load(save))
        secs = ", ".join(f"{s:.1f}" for s in r["seconds"])
        print(f"{name}: {secs} s per tile (peak RSS {rss:.0f} MB)", flush=True)

    def mean_t(i):
        return float(np.mean(results[i][0]["seconds"]))

    def agree(i, j):
        """Top-1 and second-class agreement (%), mean and max |probability difference|."""
        a, b = results[i][1].astype(np.float32), results[j][1].astype(np.float32)
        ra, rb = np.argsort(-a, axis=1), np.argsort(-b, axis=1)
        top1 = float((ra[:, 0] == rb[:, 0]).mean()) * 100
        top2 = float((ra[:, 1] == rb[:, 1]).mean()) * 100
        d = np.abs(a - b)
        classes = len(np.unique(ra[:, 0]))
        return (
            f"top-1 {top1:.3f}%, 2nd class {top2:.3f}%, |dp| mean {d.mean():.2e} max "
            f"{d.max():.2e} ({classes} distinct top-1 class(es) in the reference)"
        )

    lines = [  # (variants a line needs, the line)
        ((0, 1), lambda: f"fast / baseline time: {mean_t(0) / mean_t(1):.3f} (target <= 0.5)"),
        ((0, 1, 3), lambda: f"bf16 / baseline time: {mean_t(3) / mean_t(1):.3f} (target <= 0.3); "
                            f"bf16 / fast fp32: {mean_t(3) / mean_t(0):.3f}"),
        ((0, 2), lambda: f"low vs full postprocess (target top-1 >= 99.5%): {agree(2, 0)}"),
        ((0, 1), lambda: f"fast vs baseline: {agree(1, 0)}"),
        ((0, 3), lambda: f"bf16 vs fp32: {agree(0, 3)}"),
    ]  # fmt: skip
    for needed, line in lines:
        if all(i in results for i in needed):
            print(line())


def main(argv=None) -> int:
    return bench_main(
        argv,
        __doc__,
        "model config (default: the R50 LoveDA config)",
        add_num_tiles_argument,
        mode_targets,
    )


if __name__ == "__main__":
    sys.exit(main())
