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
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FOLDER_MB = 40.0
NO_GPU_EXIT = 2
DEFAULT_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")

# What the offline install asks pip for (it resolves their dependencies from the folder and the
# packages already installed).
REQUIREMENTS = [
    "fvcore",
    "iopath",
    "yacs",
    "open_clip_torch",
    "pycocotools",
    "matplotlib",
    "tqdm",
    # detectron2 0.5's runtime needs (tools/install_detectron2.py FALLBACK_RUNTIME_DEPS)
    "termcolor",
    "tabulate",
    "cloudpickle",
    "omegaconf",
    "hydra-core",
]
# Every distribution downloaded: REQUIREMENTS and their dependencies that a CUDA torch install
# with numpy/scipy/opencv/onnxruntime does not already have.
WHEEL_PACKAGES = REQUIREMENTS + [
    "portalocker",
    "pyyaml",
    "ftfy",
    "wcwidth",
    "regex",
    "huggingface_hub",
    "hf-xet",
    "safetensors",
    "timm",
    "requests",
    "urllib3",
    "idna",
    "certifi",
    "charset-normalizer",
    "packaging",
    "contourpy",
    "cycler",
    "fonttools",
    "kiwisolver",
    "pyparsing",
    "python-dateutil",
    "six",
    "antlr4-python3-runtime==4.9.3",  # omegaconf 2.x / hydra-core 1.3 need 4.9.*
]  # pillow (torchvision's), filelock, fsspec and typing_extensions (torch's) are there already
# Published only as sdists (pure Python): downloaded as sdists and built into wheels.
SDIST_ONLY = {"fvcore", "iopath", "antlr4-python3-runtime"}


def _name(spec: str) -> str:
    return re.split(r"[<>=!~ ;]", spec, maxsplit=1)[0].lower()


OPTIONAL_LEFT_OUT = {
    "rasterio": "GeoTIFF reading/writing of the demo (about 20 MB of GDAL): skipped",
    "tensorboard": "event files (training writes metrics.json and curves.png without it)",
}


class CheckFailed(Exception):
    """A check ran and did not pass (the message says what was compared)."""


# ---------------------------------------------------------------------- table
def format_table(rows: list[dict]) -> str:
    """rows: dicts with check, result (PASS / FAIL / SKIP), measured, target."""
    headers = ("check", "result", "measured", "tolerance / target")
    keys = ("check", "result", "measured", "target")
    cells = [headers] + [tuple(str(r.get(k, "")) for k in keys) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(headers))]
    line = "+-" + "-+-".join("-" * w for w in widths) + "-+"
    out = [line]
    for n, c in enumerate(cells):
        out.append("| " + " | ".join(v.ljust(w) for v, w in zip(c, widths)) + " |")
        if n == 0:
            out.append(line.replace("-", "="))
    out.append(line)
    failed = sum(r.get("result") == "FAIL" for r in rows)
    out.append(f"{len(rows)} checks: {failed} failed" if failed else f"{len(rows)} checks passed")
    return "\n".join(out)


# ---------------------------------------------------------------------- arguments
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
    parser.add_argument("--run-checks", action="store_true", help=argparse.SUPPRESS)
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


# ---------------------------------------------------------------------- wheels
def _pip(python: str, *args: str) -> None:
    cmd = [python, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd)
    if proc.returncode:
        raise SystemExit(f"gpu_acceptance: pip failed (exit {proc.returncode}): {' '.join(args)}")


def _folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 2**20


def download_wheels(dest: Path, python_version: str, platforms, packages=None) -> list[Path]:
    """Fill ``dest`` (see module doc); returns the files it holds."""
    sys.path.insert(0, str(ROOT / "tools"))
    import install_detectron2

    dest.mkdir(parents=True, exist_ok=True)
    wanted = packages if packages is not None else WHEEL_PACKAGES
    binary = [p for p in wanted if _name(p) not in SDIST_ONLY]
    sdists = [p for p in wanted if _name(p) in SDIST_ONLY]
    py = sys.executable
    abi = "cp" + python_version.replace(".", "")
    if binary:
        tags = []
        for plat in platforms or DEFAULT_PLATFORMS:
            tags += ["--platform", plat]
        # any=pure-Python wheels match every platform: pip accepts them with these tags too
        _pip(py, "download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
             "--python-version", python_version, "--implementation", "cp",
             "--abi", abi, "--abi", "abi3", "--abi", "none", *tags, *binary)  # fmt: skip
    if sdists:
        with tempfile.TemporaryDirectory(prefix="segclip_sdists_") as tmp:
            _pip(py, "download", "--quiet", "--no-deps", "--no-binary=:all:", "--dest", tmp,
                 *sdists)  # fmt: skip
            for sdist in sorted(Path(tmp).iterdir()):
                _pip(py, "wheel", "--quiet", "--no-deps", "--wheel-dir", str(dest), str(sdist))
    if packages is None:
        with tempfile.TemporaryDirectory(prefix="segclip_d2_") as tmp:
            archive = install_detectron2.download_fallback(Path(tmp))
            shutil.copyfile(archive, dest / install_detectron2.FALLBACK_FILE)
    files = sorted(f for f in dest.iterdir() if f.is_file() and f.name != "MANIFEST.txt")
    lines = [f"{f.stat().st_size / 2**20:7.2f} MB  {f.name}" for f in files]
    total = _folder_mb(dest)
    notes = [f"left out: {k} ({v})" for k, v in OPTIONAL_LEFT_OUT.items()]
    (dest / "MANIFEST.txt").write_text(
        f"segclip-d2 wheels for Python {python_version} "
        f"({', '.join(platforms or DEFAULT_PLATFORMS)})\n{total:.1f} MB in {len(files)} files\n"
        + "\n".join(lines + notes)
        + "\n"
    )
    print("\n".join(lines))
    print(f"{dest}: {len(files)} files, {total:.1f} MB (limit {MAX_FOLDER_MB:.0f} MB)")
    for note in notes:
        print(note)
    if total > MAX_FOLDER_MB:
        raise SystemExit(f"gpu_acceptance: {dest} holds {total:.1f} MB > {MAX_FOLDER_MB:.0f} MB")
    return files


def install_offline(python: str, wheels: Path, target: Path | None = None, packages=None) -> None:
    """Install from ``wheels`` without an index (and detectron2 from its sdist there)."""
    extra = ["--target", str(target)] if target is not None else []
    reqs = packages if packages is not None else REQUIREMENTS
    _pip(python, "install", "--quiet", "--no-index", "--find-links", str(wheels), *extra, *reqs)
    if packages is not None:
        return
    sys.path.insert(0, str(ROOT / "tools"))
    import install_detectron2

    archive = wheels / install_detectron2.FALLBACK_FILE
    if not archive.is_file():
        raise SystemExit(f"gpu_acceptance: {archive} is missing (fill the folder again)")
    with tempfile.TemporaryDirectory(prefix="segclip_d2_") as tmp:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        root = Path(tmp) / "detectron2_cdo-0.5"
        install_detectron2.patch_fallback_tree(root)
        _pip(python, "install", "--quiet", "--no-index", "--no-deps", "--no-build-isolation",
             *extra, str(root))  # fmt: skip


# ---------------------------------------------------------------------- GPU presence
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


# ---------------------------------------------------------------------- checks (GPU)
def _row(check, ok, measured, target):
    return {"check": check, "result": "PASS" if ok else "FAIL", "measured": measured,
            "target": target}  # fmt: skip


def check_op() -> list[dict]:
    """CUDA op vs CPU op vs PyTorch reference, forward and backward."""
    import torch

    sys.path.insert(0, str(ROOT / "tools"))
    from benchmark_msda import make_inputs

    from segclip_d2.layers.ms_deform_attn import ms_deform_attn, ms_deform_attn_pytorch

    def odd_inputs():
        g = torch.Generator().manual_seed(1)
        shapes = torch.tensor([[13, 17], [7, 9], [3, 5]])
        areas = shapes.prod(1)
        starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
        B, Q, H, Dh, L, P = 2, 37, 3, 24, 3, 5
        value = torch.randn(B, int(areas.sum()), H, Dh, generator=g)
        loc = torch.rand(B, Q, H, L, P, 2, generator=g) * 1.2 - 0.1  # some points outside
        attn = torch.rand(B, Q, H, L, P, generator=g).softmax(-1)
        return value, shapes, starts, loc, attn

    tols = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}  # max |diff| / max|ref|
    rows = []
    for name, make in (("R50 1024", lambda: make_inputs(1024)), ("odd sizes", odd_inputs)):
        value, shapes, starts, loc, attn = make()
        ref_in = [t.double().cuda().requires_grad_() for t in (value, loc, attn)]
        ref = ms_deform_attn_pytorch(ref_in[0], shapes.cuda(), ref_in[1], ref_in[2])
        ref_grads = torch.autograd.grad(ref.sum(), ref_in)
        cpu_in = [t.clone().requires_grad_() for t in (value, loc, attn)]
        cpu = ms_deform_attn(cpu_in[0], shapes, starts, cpu_in[1], cpu_in[2], impl="cpp")
        cpu_grads = torch.autograd.grad(cpu.sum(), cpu_in)
        scale = ref.abs().max().item()
        err_cpu = (cpu.double().cuda() - ref).abs().max().item() / scale
        rows.append(_row(f"op CPU vs reference, {name}", err_cpu <= 1e-4, f"{err_cpu:.2e}",
                         "<= 1e-4 rel"))  # fmt: skip
        for dtype, tol in tols.items():
            x = [t.to("cuda", dtype).requires_grad_() for t in (value, loc, attn)]
            try:
                out = ms_deform_attn(x[0], shapes.cuda(), starts.cuda(), x[1], x[2], impl="cpp")
                grads = torch.autograd.grad(out.float().sum(), x)
            except RuntimeError as e:
                rows.append(_row(f"op CUDA {dtype} {name}", False, str(e)[:60], "runs"))
                continue
            err = (out.double() - ref).abs().max().item() / scale
            gerr = max(
                (g.double() - r).abs().max().item() / max(r.abs().max().item(), 1e-12)
                for g, r in zip(grads, ref_grads)
            )
            dt = str(dtype).replace("torch.", "")
            rows.append(_row(f"op CUDA {dt} fwd, {name}", err <= tol, f"{err:.2e}",
                             f"<= {tol:.0e} rel"))  # fmt: skip
            rows.append(_row(f"op CUDA {dt} bwd, {name}", gerr <= tol * 10, f"{gerr:.2e}",
                             f"<= {tol * 10:.0e} rel"))  # fmt: skip
            if dtype == torch.float32:
                e_cc = (out.double().cpu() - cpu.double()).abs().max().item() / scale
                g_cc = max(
                    (g.double().cpu() - c.double()).abs().max().item() / max(c.abs().max(), 1e-12)
                    for g, c in zip(grads, cpu_grads)
                )
                rows.append(_row(f"op CUDA vs CPU fp32 fwd/bwd, {name}", max(e_cc, g_cc) <= 1e-3,
                                 f"{e_cc:.1e} / {g_cc:.1e}", "<= 1e-3 rel"))  # fmt: skip
    return rows


def _synthetic_env(tmp: Path, size: int, num_train: int) -> None:
    os.environ.update(
        DETECTRON2_DATASETS=str(tmp / "datasets"),
        SEGCLIP_SYNTHETIC_NUM_TRAIN=str(num_train),
        SEGCLIP_SYNTHETIC_NUM_VAL="2",
        SEGCLIP_SYNTHETIC_SIZE=str(size),
    )


def _cfg(config: str, opts: list[str]):
    from detectron2.config import get_cfg

    import segclip_d2  # noqa: F401
    import segclip_d2.modeling.meta_arch  # noqa: F401
    from segclip_d2 import add_segclip_config

    cfg = add_segclip_config(get_cfg())
    cfg.merge_from_file(str(ROOT / config))
    cfg.merge_from_list(opts)
    return cfg


OFFLINE = ["MODEL.WEIGHTS", "", "MODEL.SEGCLIP.TEXT.PRETRAINED", "", "MODEL.DEVICE", "cuda"]


def check_amp100(tmp: Path) -> list[dict]:
    import math

    from detectron2.engine import HookBase

    from segclip_d2.engine import SegCLIPTrainer

    _synthetic_env(tmp, 256, 64)
    cfg = _cfg("configs/synthetic/segclip_cpu.yaml", OFFLINE + [
        "SOLVER.MAX_ITER", "100", "SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.DTYPE", "float16",
        "DATASETS.TEST", "()", "TEST.EVAL_PERIOD", "0", "SOLVER.CHECKPOINT_PERIOD", "100000",
        "OUTPUT_DIR", str(tmp / "amp100"),
    ])  # fmt: skip
    losses = []

    class Record(HookBase):
        def after_step(self):
            losses.append(self.trainer.storage.history("total_loss").latest())

    trainer = SegCLIPTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.register_hooks([Record()])
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    skipped = trainer._trainer.skipped_steps
    finite = all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    return [
        _row(
            "fp16 AMP 100 it: finite losses",
            finite,
            f"{len(losses)} steps, {seconds:.0f} s",
            "no inf/NaN",
        ),  # fmt: skip
        _row(
            "fp16 AMP 100 it: loss falls",
            last < 0.8 * first,
            f"{first:.2f} -> {last:.2f} (mean of 10)",
            "last <= 0.8 x first",
        ),  # fmt: skip
        _row("fp16 AMP 100 it: skipped scaler steps", skipped <= 8, str(skipped), "<= 8"),
    ]


def check_ddp(tmp: Path, num_gpus: int) -> list[dict]:
    if num_gpus < 2:
        return [{"check": "DDP 2 GPUs vs 1", "result": "SKIP", "measured": "1 GPU",
                 "target": "needs 2+ GPUs"}]  # fmt: skip
    import torch

    opts = OFFLINE + [
        "SOLVER.OPTIMIZER", "SGD", "SOLVER.MOMENTUM", "0.0", "SOLVER.BASE_LR", "0.5",
        "SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.WEIGHT_DECAY", "0.0",
        "SOLVER.CLIP_GRADIENTS.ENABLED", "False", "MODEL.RESNETS.NORM", "FrozenBN",
        "SOLVER.AMP.ENABLED", "False", "INPUT.RANDOM_VFLIP", "False", "INPUT.RANDOM_ROTATE90",
        "False", "DATASETS.TEST", "()", "TEST.EVAL_PERIOD", "0", "DATALOADER.NUM_WORKERS", "0",
        "MODEL.SEGCLIP.LOSS.TRAIN_NUM_POINTS", "12544", "SEED", "7",
    ]  # fmt: skip
    weights = {}
    for n in (1, 2):
        out = tmp / f"ddp{n}"
        config = str(ROOT / "configs/synthetic/segclip_cpu.yaml")
        cmd = [sys.executable, str(ROOT / "train_net.py"), "--num-gpus", str(n)]
        cmd += ["--config-file", config, *opts, "OUTPUT_DIR", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if proc.returncode:
            return [_row(f"DDP {n} GPU run", False, proc.stderr.strip()[-60:], "exit 0")]
        ckpt = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
        weights[n] = ckpt["model"]
    cfg = _cfg("configs/synthetic/segclip_cpu.yaml", opts)
    from detectron2.modeling import build_model
    from detectron2.utils.env import seed_all_rng

    seed_all_rng(cfg.SEED)
    init = build_model(cfg).state_dict()
    d1 = torch.cat([(weights[1][k] - v.cpu()).flatten() for k, v in init.items()
                    if v.is_floating_point()])  # fmt: skip
    d2 = torch.cat([(weights[2][k] - v.cpu()).flatten() for k, v in init.items()
                    if v.is_floating_point()])  # fmt: skip
    rel = ((d1 - d2).norm() / d1.norm()).item()
    return [_row("DDP 2 GPUs vs 1 GPU, 3 it, same global batch", rel < 0.1,
                 f"update rel. diff {rel:.3f}", "< 0.1 (random point sampling)")]  # fmt: skip


def check_train_speed(tmp: Path) -> list[dict]:
    import torch

    from segclip_d2.engine.benchmark import benchmark

    _synthetic_env(tmp, 512, 16)
    rows = []
    for batch in (2, 4):
        cfg = _cfg("configs/loveda/segclip_R50.yaml", OFFLINE + [
            "DATASETS.TRAIN", '("synthetic_aerial_train",)', "DATASETS.TEST", "()",
            "SOLVER.IMS_PER_BATCH", str(batch), "DATALOADER.NUM_WORKERS", "2",
            "OUTPUT_DIR", str(tmp / f"speed{batch}"),
        ])  # fmt: skip
        torch.cuda.reset_peak_memory_stats()
        res = benchmark(cfg, iters=10, warmup=3)
        mem = torch.cuda.max_memory_allocated() / 2**30
        rows.append(_row(f"R50 train 512 crops, batch {batch}, AMP auto (fp16)", True,
                         f"{1 / res['wall_median']:.2f} it/s, peak {mem:.1f} GiB",
                         "reported"))  # fmt: skip
    return rows


def check_inference() -> list[dict]:
    import torch
    from detectron2.modeling import build_model

    from segclip_d2.predict import SegInferencer

    rows = []
    for mode in ("whole", "slide"):
        cfg = _cfg("configs/loveda/segclip_R50.yaml", OFFLINE + ["TEST.MODE", mode])
        model = build_model(cfg).eval()
        for precision in ("fp32", "fp16", "bf16"):
            cfg.defrost()
            cfg.TEST.PRECISION = precision
            inferencer = SegInferencer(cfg)
            for size in (512, 1024, 2048):
                image = torch.rand(3, size, size, device="cuda") * 255  # (3, H, W) RGB
                try:
                    with torch.no_grad():
                        inferencer(model.predict_sem_seg_probs, image)  # warm-up
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        times = []
                        for _ in range(3):
                            start = time.perf_counter()
                            probs = inferencer(model.predict_sem_seg_probs, image)
                            torch.cuda.synchronize()
                            times.append(time.perf_counter() - start)
                    ok = bool(torch.isfinite(probs).all())
                    mem = torch.cuda.max_memory_allocated() / 2**30
                    measured = f"{sorted(times)[1] * 1000:.0f} ms, peak {mem:.2f} GiB"
                except (RuntimeError, AttributeError) as e:
                    ok, measured = False, str(e)[:60]
                rows.append(_row(f"inference {mode} {size} {precision}", ok, measured,
                                 "finite probabilities"))  # fmt: skip
    return rows


CHECKS = ("op", "amp100", "ddp", "train_speed", "inference")


def run_checks(names: list[str]) -> int:
    import torch

    num_gpus = torch.cuda.device_count()
    rows = []
    with tempfile.TemporaryDirectory(prefix="segclip_gpu_check_") as tmpdir:
        tmp = Path(tmpdir)
        steps = {
            "op": check_op,
            "amp100": lambda: check_amp100(tmp),
            "ddp": lambda: check_ddp(tmp, num_gpus),
            "train_speed": lambda: check_train_speed(tmp),
            "inference": check_inference,
        }
        for name in names:
            start = time.perf_counter()
            try:
                new = steps[name]()
            except Exception as e:  # a crashing check is a failed check; the others still run
                new = [_row(name, False, f"{type(e).__name__}: {str(e)[:70]}", "runs")]
            rows += new
            print(f"[gpu_acceptance] {name}: {time.perf_counter() - start:.0f} s", flush=True)
            for r in new:
                print(f"  {r['result']} {r['check']}: {r['measured']} ({r['target']})", flush=True)
    print(format_table(rows))
    return 1 if any(r["result"] == "FAIL" for r in rows) else 0


# ---------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.run_checks:
        return run_checks(args.checks.split(","))
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
    cmd = [python, str(Path(__file__).resolve()), "--run-checks", "--checks", args.checks]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
