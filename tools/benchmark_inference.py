#!/usr/bin/env python
"""The inference speed targets as ratios measured in ONE process (A/B): the fast model, the
baseline (same weights, PyTorch deformable attention + full-resolution post-processing) and the
fast model under bf16 autocast, timed alternately on the real LoveDA tiles after a warm-up,
median of ``--repeats``; each forward split into the deformable-attention op, post-processing
and the rest.

    python tools/benchmark_inference.py --ab --repeats 5 --allow-random-weights \
        --opts MODEL.WEIGHTS ""

(``--ab`` names the measurement, the only one this tool makes.) The other benchmarks:
``tools/benchmark_latency.py`` (latency and memory by size, FLOPs),
``tools/benchmark_targets.py`` (speed and agreement per variant, one process each),
``tools/benchmark_geotiff.py`` (the demo on large GeoTIFFs), ``tools/benchmark_onnx.py``
(onnxruntime vs PyTorch). Nothing here is part of the test suite.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import (  # noqa: E402
    R50_CONFIG,
    REAL_TILES,
    add_num_tiles_argument,
    bench_main,
    load_model,
    test_image,
)


def mode_ab(args) -> None:
    """The speed targets as ratios measured in one process: the fast model, the baseline (same
    weights, PyTorch deformable attention + full-resolution post-processing) and the fast model
    under bf16 autocast, timed alternately on the real tiles after a warm-up, median of repeats."""
    import statistics

    import torch

    from segclip_d2.raster.sources import ArraySource

    torch.set_num_threads(args.threads)
    config = args.config or str(R50_CONFIG)
    opts = list(args.opts)
    _, fast, _ = load_model(config, opts)
    baseline_opts = ["MODEL.SEGCLIP.MSDA_IMPL", "pytorch", "MODEL.SEGCLIP.POSTPROCESS", "full"]
    _, base, _ = load_model(config, opts + baseline_opts)
    base.load_state_dict(fast.state_dict())
    tiles = sorted(REAL_TILES.glob("*.png"))[: args.num_tiles] if REAL_TILES.is_dir() else []
    if tiles:
        images = [torch.from_numpy(ArraySource(t).rgb).permute(2, 0, 1).float() for t in tiles]
    else:
        print(f"real tiles not found at {REAL_TILES}: timing a synthetic 1024x1024 image")
        images = [test_image(1024)]

    # Where the time goes, per variant: the deformable-attention op (every call of the
    # module-level function, which MSDeformAttn looks up at call time), the network (backbone,
    # pixel decoder, predictor, via forward hooks) and post-processing (the rest of
    # predict_sem_seg_probs: combining classes and masks, upsampling, argmax-ready probs).
    import segclip_d2.layers.ms_deform_attn as msda_mod

    parts = {"op": 0.0, "net": 0.0}
    real_op = msda_mod.ms_deform_attn

    def timed_op(*a, **k):
        t0 = time.perf_counter()
        try:
            return real_op(*a, **k)
        finally:
            parts["op"] += time.perf_counter() - t0

    msda_mod.ms_deform_attn = timed_op
    starts = {}
    for model in (fast, base):
        for name in ("backbone", "pixel_decoder", "transformer_decoder"):
            mod = getattr(model, name)
            mod.register_forward_pre_hook(
                lambda m, i, n=name: starts.__setitem__(n, time.perf_counter())
            )
            mod.register_forward_hook(
                lambda m, i, o, n=name: parts.__setitem__(
                    "net", parts["net"] + time.perf_counter() - starts[n]
                )
            )

    def run(model, bf16=False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for img in images:
                model.predict_sem_seg_probs(img[None])

    variants = {
        "fast fp32": lambda: run(fast),
        "baseline fp32": lambda: run(base),
        "fast bf16": lambda: run(fast, bf16=True),
    }
    times = {name: [] for name in variants}
    split = {name: [] for name in variants}
    with torch.no_grad():
        for fn in variants.values():  # warm-up at the timed sizes
            fn()
        for _ in range(max(args.repeats, 3)):
            for name, fn in variants.items():
                parts.update(op=0.0, net=0.0)
                t0 = time.perf_counter()
                fn()
                total = time.perf_counter() - t0
                times[name].append(total / len(images))
                split[name].append(
                    (parts["op"] / len(images), (total - parts["net"]) / len(images))
                )
    msda_mod.ms_deform_attn = real_op
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(
        f"\n== one-process A/B, {Path(config).name}, {len(images)} image(s) of 1024x1024, "
        f"CPU {args.threads} threads, median of {len(times['fast fp32'])} =="
    )
    from segclip_d2.predict import onednn_linear

    isa = msda_mod._C.cpu_isa() if msda_mod.extension_available() else "not built"
    with torch.no_grad():
        route = (
            "oneDNN" if onednn_linear.uses_onednn(torch.ones(1), torch.ones(1, 1)) else "F.linear"
        )
    print(f"(MSDA CPU kernel copy: {isa}; fp32 linear layers at inference: {route})")
    print(f"{'variant':14s} {'total':>8s} {'MSDA op':>8s} {'post':>8s} {'rest':>8s}  (s/image)")
    for name, t in med.items():
        op = statistics.median(o for o, _ in split[name])
        post = statistics.median(p for _, p in split[name])
        print(f"{name:14s} {t:8.2f} {op:8.2f} {post:8.2f} {t - op - post:8.2f}")
    print(f"fast / baseline: {med['fast fp32'] / med['baseline fp32']:.3f} (target <= 0.5)")
    print(f"bf16 / baseline: {med['fast bf16'] / med['baseline fp32']:.3f} (target <= 0.3)")
    print(f"bf16 speed-up over fp32: {med['fast fp32'] / med['fast bf16']:.2f}x (target >= 2)")


def _arguments(p) -> None:
    p.add_argument("--ab", action="store_true", help="the one-process A/B (the default)")
    add_num_tiles_argument(p)


def main(argv=None) -> int:
    return bench_main(
        argv, __doc__, "model config (default: the R50 LoveDA config)", _arguments, mode_ab
    )


if __name__ == "__main__":
    sys.exit(main())
