#!/usr/bin/env python
"""Inference benchmarks: latency, peak memory, text-encoder calls, FLOPs, and the issue's targets.

Every measured case runs in its own subprocess, so its peak RSS (``ru_maxrss`` of that process,
read by the parent with ``os.wait4``) belongs to that case alone.

    # table: 512 / 1024 / 2048 inputs, whole vs slide, small CPU config + FLOPs at 512
    python tools/benchmark_inference.py --table
    # targets on the R50 LoveDA config at 1024 (CPU, 2 threads): fast path vs
    # MSDA_IMPL pytorch + POSTPROCESS full, bf16, and pixel agreement on real tiles
    python tools/benchmark_inference.py --targets
    # demo memory / time on synthetic GeoTIFFs of growing size (every output switched on,
    # COG cost: class vs class-cog, all-nocog vs all)
    python tools/benchmark_inference.py --geotiff-scaling --sizes 2048 4096 8192 --variants all
    # exported models (tools/export_onnx.py): onnxruntime vs the PyTorch fast path, same tile,
    # at each file's tile size; the PyTorch model is built from the card's config (+ --opts)
    python tools/benchmark_inference.py --onnx model_512.onnx model_1024.onnx \
        [--opts MODEL.WEIGHTS model_best.pth]

Nothing here is part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
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


# ---------------------------------------------------------------------- subprocess plumbing
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
    result["self_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------- in-child helpers
def load_model(config: str, opts: list[str], optimize: bool = True):
    """Build (and load MODEL.WEIGHTS when it is a local file) the model in eval mode; with
    ``optimize`` (unless SEGCLIP_PLAIN_MODEL=1) apply ``optimize_for_inference`` as the demo and
    evaluation do. Returns (cfg, model, a SegInferencer of cfg)."""
    import torch
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    import segclip_d2.modeling  # noqa: F401  (registers the model parts)
    import segclip_d2.modeling.backbone  # noqa: F401  (CLIP ResNet backbone)
    import segclip_d2.modeling.meta_arch  # noqa: F401  (SegCLIP)
    from segclip_d2 import add_segclip_config
    from segclip_d2.predict import SegInferencer

    cfg = get_cfg()
    add_segclip_config(cfg)
    cfg.merge_from_file(config)
    cfg.merge_from_list(OFFLINE_OPTS + list(opts))
    cfg.freeze()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:  # main() checked it is a local file (or that random was allowed)
        from segclip_d2.checkpoint.checkpointer import InferenceCheckpointer

        InferenceCheckpointer(model).load(cfg.MODEL.WEIGHTS)  # a trained local checkpoint
    if optimize and os.environ.get("SEGCLIP_PLAIN_MODEL", "0") in ("", "0"):
        from segclip_d2.predict.optimize import optimize_for_inference

        optimize_for_inference(model, cfg.MODEL.DEVICE, cfg.TEST.PRECISION)
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


def case_forward(args) -> None:
    """One timed inference of a (3, size, size) image through SegInferencer."""
    import torch

    torch.set_num_threads(args.threads)
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


def case_onnx(args) -> None:
    """One timed onnxruntime run of the exported model on the :func:`test_image` tile. The
    process is started by :data:`NO_TORCH_LAUNCHER`, so torch and detectron2 are never imported
    (as on a machine without them; importing ``segclip_d2`` would otherwise import them too)."""
    from segclip_d2.deploy.onnx_predictor import OnnxSegmenter

    seg = OnnxSegmenter(args.onnx[0], threads=args.threads)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    tile = test_image_rgb(seg.tile_size)[None]
    seg.predict_batch(tile)  # warm-up (onnxruntime allocates its arenas on the first run)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        probs = seg.predict_batch(tile)
        times.append(time.perf_counter() - t0)
    emit({"seconds": min(times), "model_rss_mb": base_rss, "shape": list(probs.shape),
          "torch_imported": "torch" in sys.modules})  # fmt: skip


# python -c program: block torch / detectron2 imports, then run this script with the arguments.
NO_TORCH_LAUNCHER = """
import runpy, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "detectron2"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
sys.meta_path.insert(0, NoTorch())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def mode_onnx(args) -> None:
    """onnxruntime vs the PyTorch fast path (fp32, whole tile) at each file's tile size."""
    import onnx

    widths = (6, 16, 16, 10, 16, 16)
    print(f"\n== onnxruntime vs PyTorch fast path, fp32, CPU {args.threads} threads, one tile ==")
    print(fmt_row(("size", "onnxruntime s", "PyTorch s", "ratio", "ORT peak RSS", "PT peak RSS"),
                  widths))  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="segclip_bench_onnx_"))
    for i, path in enumerate(args.onnx):
        model = onnx.load(path, load_external_data=False)
        size = model.graph.input[0].type.tensor_type.shape.dim[2].dim_value
        card = json.loads({p.key: p.value for p in model.metadata_props}["segclip_model_card"])
        del model
        config = args.config
        if not config:
            config = tmp / f"card_config_{i}.yaml"
            config.write_text(card["config"])
        extra = ["--repeats", str(args.repeats)]
        runs = {}
        for name, argv in (
            ("ort", [sys.executable, "-c", NO_TORCH_LAUNCHER] + child_argv(
                "onnx", config, size, [], args.threads, extra + ["--onnx", path])[1:]),
            ("pt", child_argv("forward", config, size, ["TEST.MODE", "whole", "TEST.PRECISION",
                              "fp32"] + list(args.opts), args.threads, extra)),
        ):  # fmt: skip
            code, wall, rss, text = run_child(argv)
            if code:
                print(f"{name} at {size}: FAILED\n{text[-2000:]}")
                runs = {}
                break
            runs[name] = (child_json(text), rss)
        if runs:
            (ort, ort_rss), (pt, pt_rss) = runs["ort"], runs["pt"]
            assert not ort["torch_imported"]
            print(fmt_row((size, f"{ort['seconds']:.3f}", f"{pt['seconds']:.3f}",
                           f"{ort['seconds'] / pt['seconds']:.2f}", f"{ort_rss:.0f} MB",
                           f"{pt_rss:.0f} MB"), widths), flush=True)  # fmt: skip
    print("(ratio = onnxruntime / PyTorch seconds; peak RSS of each child process)")


def case_tiles(args) -> None:
    """Class maps of the real LoveDA tiles (full 1024 size), timed; saved to ``args.save``."""
    import numpy as np
    import torch

    from segclip_d2.raster.io import ArraySource

    torch.set_num_threads(args.threads)
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
    """fvcore FLOPs of predict_sem_seg_probs at ``size``."""
    import torch
    from fvcore.nn import FlopCountAnalysis

    torch.set_num_threads(args.threads)
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


# ---------------------------------------------------------------------- parent modes
def child_argv(case: str, config, size=0, opts=(), threads=2, extra=()) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_case",
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


def mode_table(args) -> None:
    widths = (6, 6, 10, 12, 14, 10)
    print(f"\n== latency / peak RSS, {Path(args.config).name}, {args.threads} threads ==")
    print(fmt_row(("size", "mode", "seconds", "peak RSS MB", "model RSS MB", "text calls"), widths))
    for size in args.sizes:
        for mode in ("whole", "slide"):
            opts = ["TEST.MODE", mode] + list(args.opts)
            code, wall, rss, text = run_child(
                child_argv("forward", args.config, size, opts, args.threads)
            )
            if code:
                print(fmt_row((size, mode, "FAILED", f"{rss:.0f}", "", ""), widths))
                print(text[-2000:])
                continue
            r = child_json(text)
            print(
                fmt_row(
                    (
                        size,
                        mode,
                        f"{r['seconds']:.2f}",
                        f"{rss:.0f}",
                        f"{r['model_rss_mb']:.0f}",
                        r["text_encoder_calls"],
                    ),
                    widths,
                ),
                flush=True,
            )
    code, wall, rss, text = run_child(
        child_argv("flops", args.config, 512, list(args.opts), args.threads)
    )
    if code:
        print("FLOPs: FAILED\n" + text[-2000:])
    else:
        r = child_json(text)
        print(
            f"\nfvcore FLOPs at 512x512: {r['gflops']:.1f} GFLOPs (fvcore counts one multiply-add "
            f"as one flop); ops fvcore cannot count (ignored): {r['unsupported_ops']}"
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
        argv = child_argv(
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

    if 0 in results and 1 in results:
        print(f"fast / baseline time: {mean_t(0) / mean_t(1):.3f} (target <= 0.5)")
    if 3 in results and 1 in results:
        print(
            f"bf16 / baseline time: {mean_t(3) / mean_t(1):.3f} (target <= 0.3); "
            f"bf16 / fast fp32: {mean_t(3) / mean_t(0):.3f}"
        )
    if 0 in results and 2 in results:
        print(f"low vs full postprocess (target top-1 >= 99.5%): {agree(2, 0)}")
    if 0 in results and 1 in results:
        print(f"fast vs baseline: {agree(1, 0)}")
    if 0 in results and 3 in results:
        print(f"bf16 vs fp32: {agree(0, 3)}")


def mode_ab(args) -> None:
    """The speed targets as ratios measured in one process: the fast model, the baseline (same
    weights, PyTorch deformable attention + full-resolution post-processing) and the fast model
    under bf16 autocast, timed alternately on the real tiles after a warm-up, median of repeats."""
    import statistics

    import torch

    from segclip_d2.raster.io import ArraySource

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


def make_geotiff(path: Path, size: int, seed: int = 0) -> None:
    """A synthetic uint16 3-band GeoTIFF (EPSG:32633, 0.5 m pixels, nodata 0 border), written by
    row blocks so even large ones take little memory."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    g = np.random.default_rng(seed)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=size,
        width=size,
        count=3,
        dtype="uint16",
        crs="EPSG:32633",
        nodata=0,
        tiled=True,
        blockxsize=256,
        blockysize=256,
        transform=from_origin(500000, 5000000, 0.5, 0.5),
    ) as ds:
        step = 512
        for y in range(0, size, step):
            h = min(step, size - y)
            yy = np.arange(y, y + h)[:, None]
            xx = np.arange(size)[None]
            base = (np.sin(yy / 97.0) + np.cos(xx / 61.0)) * 1000 + 2000
            block = np.stack([base + g.normal(0, 200, (h, size)) for _ in range(3)])
            block = np.clip(block, 1, 4095).astype(np.uint16)
            block[:, :, :16] = 0  # a no-data strip
            ds.write(block, window=Window(0, y, size, h))


# Demo output flags of each --geotiff-scaling variant.
OUTPUT_VARIANTS = {
    "class": ["--no-cog"],
    "class-cog": ["--cog"],
    "all": ["--cog", "--probabilities", "--confidence", "--vector", "gpkg"],
    "all-nocog": ["--no-cog", "--probabilities", "--confidence", "--vector", "gpkg"],
}


def mode_geotiff_scaling(args) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="segclip_geotiff_"))
    print(f"\n== demo on synthetic GeoTIFFs, {Path(args.config).name}, block {args.block_size} ==")
    widths = (8, 12, 10, 10, 12, 14)
    print(fmt_row(("size", "outputs", "Mpixels", "seconds", "s / Mpix", "peak RSS MB"), widths))
    for size in args.sizes:
        tif = tmp / f"scene_{size}.tif"
        make_geotiff(tif, size)
        for variant in args.variants:
            _geotiff_case(args, tmp, tif, size, variant, widths)
        tif.unlink()
    print(f"(wall time includes model build; outputs in {tmp})")


def _geotiff_case(args, tmp, tif, size, variant, widths) -> None:
    """One demo run in a child process; prints its row."""
    out = tmp / f"out_{size}_{variant}"
    argv = [
        sys.executable,
        str(REPO / "demo" / "demo.py"),
        "--config-file",
        str(args.config),
        "--input",
        str(tif),
        "--output",
        str(out),
        "--no-progress",
        *(["--allow-random-weights"] if args.allow_random_weights else []),
        "--block-size",
        str(args.block_size),
        "--block-margin",
        str(args.block_margin),
        *OUTPUT_VARIANTS[variant],
        "--opts",
        *OFFLINE_OPTS,
        *args.opts,
    ]
    env_threads = f"torch threads {args.threads}"
    code, wall, rss, text = run_child(
        ["env", f"OMP_NUM_THREADS={args.threads}", *argv], timeout=3600
    )
    if code:
        print(f"{size} {variant}: FAILED ({env_threads})\n{text[-3000:]}")
        return
    mpix = size * size / 1e6
    row = (size, variant, f"{mpix:.1f}", f"{wall:.1f}", f"{wall / mpix:.2f}", f"{rss:.0f}")
    print(fmt_row(row, widths), flush=True)


def weights_of(opts: list[str]) -> str:
    """The last ``MODEL.WEIGHTS`` value of an override list ("" when not given)."""
    pairs = dict(zip(opts[::2], opts[1::2]))
    return str(pairs.get("MODEL.WEIGHTS", ""))


def _main(argv=None) -> int:
    from segclip_d2.errors import (
        ArgumentParser,
        UserError,
        check_trained_weights,
        check_weights_file,
    )

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--table", action="store_true", help="latency/memory table + FLOPs")
    p.add_argument("--targets", action="store_true", help="R50 1024 speed/agreement targets")
    p.add_argument(
        "--ab", action="store_true", help="R50 1024 speed ratios measured in one process"
    )
    p.add_argument("--geotiff-scaling", action="store_true", help="demo memory/time vs size")
    p.add_argument(
        "--onnx", nargs="+", default=[], metavar="FILE", help="exported models vs PyTorch"
    )
    p.add_argument(
        "--config", default=None, help="default: the small CPU config, R50 LoveDA for --targets"
    )
    p.add_argument("--sizes", type=int, nargs="+", default=None)
    p.add_argument(
        "--variants",
        nargs="+",
        choices=sorted(OUTPUT_VARIANTS),
        default=["class"],
        help="--geotiff-scaling outputs: class map only (plain / COG), or every output "
        "(probabilities, confidence, GeoPackage; COG or not)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--num-tiles", type=int, default=2)
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--block-margin", type=int, default=128)
    p.add_argument("--size", type=int, default=512, help=argparse.SUPPRESS)
    p.add_argument("--save", default="", help=argparse.SUPPRESS)
    p.add_argument("--_case", default="", help=argparse.SUPPRESS)
    p.add_argument(
        "--allow-random-weights",
        action="store_true",
        help="measure a randomly initialised model (speed is the same; agreement figures are "
        "then meaningless) when --opts gives no MODEL.WEIGHTS",
    )
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[])
    args = p.parse_args(argv)
    cases = {"forward": case_forward, "tiles": case_tiles, "flops": case_flops, "onnx": case_onnx}
    if args._case:
        cases[args._case](args)
        return 0
    if not (args.table or args.targets or args.ab or args.geotiff_scaling or args.onnx):
        p.error("choose --table, --targets, --ab, --geotiff-scaling and/or --onnx")
    if len(args.opts) % 2:
        raise UserError("--opts", "odd number of items: each KEY needs a VALUE", None)
    weights = weights_of(args.opts)
    if "://" in weights:
        raise UserError(
            f"--opts MODEL.WEIGHTS {weights}",
            "remote weights are not fetched here",
            "download the checkpoint and pass its local path",
        )
    check_weights_file(weights, "--opts MODEL.WEIGHTS")
    check_trained_weights(weights, args.allow_random_weights)
    if args.table:
        args.sizes = args.sizes or [512, 1024, 2048]
        mode_table(argparse.Namespace(**{**vars(args), "config": args.config or str(SMALL_CONFIG)}))
    if args.targets:
        mode_targets(args)
    if args.ab:
        mode_ab(args)
    if args.onnx:
        mode_onnx(args)
    if args.geotiff_scaling:
        args.sizes = args.sizes or [2048, 4096, 8192]
        args.config = args.config or str(SMALL_CONFIG)
        mode_geotiff_scaling(args)
    return 0


def main(argv=None) -> int:
    from segclip_d2.errors import run_main

    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
