#!/usr/bin/env python
"""Inference latency and peak memory at growing input sizes, whole vs sliding window, and the
model's FLOPs at 512. Every case runs in its own process (``tools/bench_case.py``), so its peak
RSS belongs to it alone.

    python tools/benchmark_latency.py --allow-random-weights            # small CPU config
    python tools/benchmark_latency.py --config configs/loveda/segclip_R50.yaml \\
        --sizes 512 1024 --opts MODEL.WEIGHTS model_best.pth

Nothing here is part of the test suite.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import (  # noqa: E402
    SMALL_CONFIG,
    bench_main,
    case_argv,
    child_json,
    fmt_row,
    run_child,
)


def table(config, sizes, opts, threads, repeats) -> None:
    widths = (6, 6, 10, 12, 14, 10)
    print(f"\n== latency / peak RSS, {Path(config).name}, {threads} threads ==")
    print(fmt_row(("size", "mode", "seconds", "peak RSS MB", "model RSS MB", "text calls"), widths))
    for size in sizes:
        for mode in ("whole", "slide"):
            argv = case_argv("forward", config, size, ["TEST.MODE", mode, *opts], threads,
                             ["--repeats", str(repeats)])  # fmt: skip
            code, wall, rss, text = run_child(argv)
            if code:
                print(fmt_row((size, mode, "FAILED", f"{rss:.0f}", "", ""), widths))
                print(text[-2000:])
                continue
            r = child_json(text)
            row = (size, mode, f"{r['seconds']:.2f}", f"{rss:.0f}", f"{r['model_rss_mb']:.0f}",
                   r["text_encoder_calls"])  # fmt: skip
            print(fmt_row(row, widths), flush=True)
    code, wall, rss, text = run_child(case_argv("flops", config, 512, list(opts), threads))
    if code:
        print("FLOPs: FAILED\n" + text[-2000:])
        return
    r = child_json(text)
    print(
        f"\nfvcore FLOPs at 512x512: {r['gflops']:.1f} GFLOPs (fvcore counts one multiply-add "
        f"as one flop); ops fvcore cannot count (ignored): {r['unsupported_ops']}"
    )


def _arguments(p) -> None:
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])


def _run(args) -> None:
    table(args.config or str(SMALL_CONFIG), args.sizes, args.opts, args.threads, args.repeats)


def main(argv=None) -> int:
    return bench_main(
        argv, __doc__, "model config (default: the small synthetic CPU config)", _arguments, _run
    )


if __name__ == "__main__":
    sys.exit(main())
