#!/usr/bin/env python
"""Time ONE inference case in this process and print its result as a ``RESULT {json}`` line.

The latency and target benchmarks (``tools/benchmark_latency.py``, ``tools/benchmark_targets.py``)
run every case through this script in its own process, so that the case's peak memory
(``ru_maxrss``) belongs to it alone; it can also be run by hand:

    python tools/bench_case.py forward --config configs/synthetic/segclip_cpu.yaml --size 1024 \\
        --opts MODEL.WEIGHTS model_final.pth TEST.MODE slide
    python tools/bench_case.py tiles --config ... --save maps.npy [--num-tiles 2]
    python tools/bench_case.py flops --config ... --size 512

forward: one (3, S, S) test image through the configured SegInferencer (best of --repeats);
tiles: class probabilities of the real LoveDA tiles at full size, timed, saved to --save;
flops: fvcore FLOPs of ``predict_sem_seg_probs`` of the plain (not optimised) model.
The model is built by the project's loader; a model without weights is measured as is.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import REAL_TILES, emit, load_model, test_image  # noqa: E402


def case_forward(args) -> None:
    import torch

    cfg, model, inferencer = load_model(args.config, args.opts)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    image = test_image(args.size)
    with torch.no_grad():
        inferencer(model.predict_sem_seg_probs, test_image(64))  # warm-up (lazy init)
        calls0 = model.text_encoder.num_encoder_calls
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            probs = inferencer(model.predict_sem_seg_probs, image)
            times.append(time.perf_counter() - t0)
    emit(
        {
            "seconds": min(times),
            "model_rss_mb": base_rss,
            "text_encoder_calls": model.text_encoder.num_encoder_calls,
            "text_encoder_calls_in_timed_runs": model.text_encoder.num_encoder_calls - calls0,
            "predict_calls": inferencer.num_predict_calls,
            "shape": list(probs.shape),
        }
    )


def case_tiles(args) -> None:
    import numpy as np
    import torch

    from segclip_d2.raster.sources import ArraySource

    cfg, model, inferencer = load_model(args.config, args.opts)
    tiles = sorted(REAL_TILES.glob("*.png"))[: args.num_tiles]
    maps, times = [], []
    images = [torch.from_numpy(ArraySource(t).rgb).permute(2, 0, 1).float() for t in tiles]
    with torch.no_grad():
        # Warm-up at the timed size: oneDNN builds its kernels for each new shape on first use.
        inferencer(model.predict_sem_seg_probs, images[0])
        for img in images:
            t0 = time.perf_counter()
            probs = inferencer(model.predict_sem_seg_probs, img)
            times.append(time.perf_counter() - t0)
            maps.append(probs.to(torch.float16).numpy())  # (K, H, W)
    np.save(args.save, np.stack(maps))  # (T, K, H, W) class probabilities
    emit({"seconds": times, "tiles": [t.name for t in tiles]})


def case_flops(args) -> None:
    import torch
    from fvcore.nn import FlopCountAnalysis

    cfg, model, _ = load_model(args.config, args.opts, optimize=False)  # the plain model

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m.predict_sem_seg_probs(x)

    image = test_image(args.size)[None]
    with torch.no_grad():
        fca = FlopCountAnalysis(Wrap(model), image)
        fca.unsupported_ops_warnings(False)
        fca.uncalled_modules_warnings(False)
        total = fca.total()
        unsupported = {k: int(v) for k, v in fca.unsupported_ops().items()}
    emit({"gflops": total / 1e9, "unsupported_ops": unsupported})


CASES = {"forward": case_forward, "tiles": case_tiles, "flops": case_flops}


def _main(argv=None) -> int:
    import torch

    from segclip_d2.errors import ArgumentParser

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("case", choices=sorted(CASES))
    p.add_argument("--config", required=True, help="model config (YAML)")
    p.add_argument("--size", type=int, default=512, help="test image size (forward, flops)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--num-tiles", type=int, default=2, help="real tiles (tiles)")
    p.add_argument("--save", default="", help="where the tiles' probabilities go (tiles)")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    CASES[args.case](args)
    return 0


def main(argv=None) -> int:
    from segclip_d2.errors import run_main

    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
