#!/usr/bin/env python
"""The GPU checks of the acceptance run and their table (run by ``tools/gpu_acceptance.py``
after the setup; it can be run alone on a set-up GPU machine):

    PYTHONPATH=. python tools/gpu_checks.py [--checks op,amp100,fp16_train_net,ddp,...]

Every check prints one row per comparison: what was compared, the measured difference or
figure, and the tolerance or target. The exit status is 1 when any check fails (a crashing
check is a failed check; the others still run). Models and configs are loaded by the project's
one loader (:mod:`segclip_d2.predict.load`), checkpoints by its safe reader.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
    """The config through the project's one loader (safe YAML, checked keys)."""
    import segclip_d2  # noqa: F401  (registers the datasets)
    from segclip_d2.config import load_config

    return load_config(str(ROOT / config), opts)


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


def check_fp16_train_net(tmp: Path, device: str = "cuda") -> list[dict]:
    """6 iterations of ``train_net.py`` itself under fp16 autocast with the GradScaler (what
    ``SOLVER.AMP.DTYPE auto`` picks on GPUs without bf16), whatever ``auto`` picks here."""
    import json

    out = tmp / f"fp16_train_net_{device}"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.update(DETECTRON2_DATASETS=str(tmp / "datasets_fp16"), SEGCLIP_SYNTHETIC_NUM_TRAIN="4",
               SEGCLIP_SYNTHETIC_NUM_VAL="2", SEGCLIP_SYNTHETIC_SIZE="64")  # fmt: skip
    cmd = [sys.executable, str(ROOT / "train_net.py"), "--config-file",
           str(ROOT / "configs/synthetic/segclip_cpu.yaml"), "--num-gpus", "1",
           "MODEL.DEVICE", device, "MODEL.SEGCLIP.TEXT.PRETRAINED", "",
           "SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.DTYPE", "float16", "SOLVER.MAX_ITER", "6",
           "SOLVER.IMS_PER_BATCH", "2", "INPUT.CROP.SIZE", "(64, 64)",
           "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", "()", "TEST.EVAL_PERIOD", "0",
           "OUTPUT_DIR", str(out)]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    last = (proc.stderr.strip().splitlines() or [""])[-1][:70]
    said = f"exit {proc.returncode}, {seconds:.0f} s" + (f": {last}" if proc.returncode else "")
    rows = [_row("fp16 AMP train_net.py 6 it: exit 0", proc.returncode == 0, said, "exit 0")]
    metrics = out / "metrics.json"
    records = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
    iters = max((r.get("iteration", -1) for r in records), default=-1) + 1
    scaled = any("amp_skipped_steps" in r for r in records)
    ok = (out / "model_final.pth").is_file() and iters == 6 and scaled
    rows.append(_row("fp16 AMP train_net.py 6 it: model_final.pth, scaler ran", ok,
                     f"{iters} iterations logged, amp_skipped_steps logged: {scaled}",
                     "6 iterations, GradScaler in use"))  # fmt: skip
    return rows


def update_rel_diff(init: dict, one: dict, two: dict) -> float:
    """|update_two - update_one| / |update_one| over the floating-point entries of ``init``
    (the updates: trained weights minus ``init``)."""
    import torch

    keys = [k for k, v in init.items() if v.is_floating_point()]
    d1 = torch.cat([(one[k].float() - init[k].cpu().float()).flatten() for k in keys])
    d2 = torch.cat([(two[k].float() - init[k].cpu().float()).flatten() for k in keys])
    return ((d1 - d2).norm() / d1.norm()).item()


def check_ddp(tmp: Path, num_gpus: int) -> list[dict]:
    if num_gpus < 2:
        return [{"check": "DDP 2 GPUs vs 1", "result": "SKIP", "measured": "1 GPU",
                 "target": "needs 2+ GPUs"}]  # fmt: skip
    from segclip_d2.checkpoint.files import read_checkpoint

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
        weights[n] = read_checkpoint(str(out / "model_final.pth"))["model"]
    cfg = _cfg("configs/synthetic/segclip_cpu.yaml", opts)
    from detectron2.modeling import build_model
    from detectron2.utils.env import seed_all_rng

    import segclip_d2.modeling.meta_arch  # noqa: F401  (registers SegCLIP)

    seed_all_rng(cfg.SEED)
    init = build_model(cfg).state_dict()
    rel = update_rel_diff(init, weights[1], weights[2])
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


def _timed_inference(inferencer, model, image, device) -> tuple[str, bool]:
    """(measured text, ok) of one image: median of 3 runs after a warm-up, peak memory on
    CUDA, and how many probabilities are not finite (the comparison: 0 of all of them)."""
    import torch

    cuda = device.startswith("cuda")
    with torch.no_grad():
        inferencer(model.predict_sem_seg_probs, image)  # warm-up
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            probs = inferencer(model.predict_sem_seg_probs, image)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    bad = int((~torch.isfinite(probs)).sum())
    mem = f", peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else ""
    measured = f"{sorted(times)[1] * 1000:.0f} ms{mem}, {bad} of {probs.numel()} not finite"
    return measured, bad == 0


def check_inference(
    device: str = "cuda",
    config: str = "configs/loveda/segclip_R50.yaml",
    sizes=(512, 1024, 2048),
    precisions=("fp32", "fp16", "bf16"),
) -> list[dict]:
    """Latency, peak memory and finite probabilities of the model the demo runs (built by the
    project's loader, optimised for inference), whole and slide, per precision and size."""
    import torch

    from segclip_d2.predict import SegInferencer
    from segclip_d2.predict.load import load_model

    rows = []
    for mode in ("whole", "slide"):
        for precision in precisions:
            opts = OFFLINE[:-1] + [device, "TEST.MODE", mode]
            cfg, model = load_model(str(ROOT / config), opts=opts, device=device,
                                    precision=precision, allow_random_weights=True)  # fmt: skip
            inferencer = SegInferencer(cfg)
            for size in sizes:
                image = torch.rand(3, size, size, device=device) * 255  # (3, H, W) RGB
                try:
                    measured, ok = _timed_inference(inferencer, model, image, device)
                except (RuntimeError, AttributeError) as e:
                    ok, measured = False, str(e)[:60]
                rows.append(_row(f"inference {mode} {size} {precision}", ok, measured,
                                 "0 non-finite probabilities"))  # fmt: skip
    return rows


CHECKS = ("op", "amp100", "fp16_train_net", "ddp", "train_speed", "inference")


def run_checks(names: list[str]) -> int:
    import torch

    num_gpus = torch.cuda.device_count()
    rows = []
    with tempfile.TemporaryDirectory(prefix="segclip_gpu_check_") as tmpdir:
        tmp = Path(tmpdir)
        steps = {
            "op": check_op,
            "amp100": lambda: check_amp100(tmp),
            "fp16_train_net": lambda: check_fp16_train_net(tmp),
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checks", default=",".join(CHECKS), help="comma-separated checks")
    args = parser.parse_args(argv)
    unknown = set(args.checks.split(",")) - set(CHECKS)
    if unknown:
        parser.error(f"--checks: unknown {', '.join(sorted(unknown))}; choose from {CHECKS}")
    return run_checks(args.checks.split(","))


if __name__ == "__main__":
    sys.exit(main())
