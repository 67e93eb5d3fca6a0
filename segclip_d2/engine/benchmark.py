"""Measure training seconds per iteration of a config (wall clock and process CPU time).

    python -m segclip_d2.engine.benchmark --config-file configs/synthetic/segclip_cpu.yaml \
        --iters 10 [--amp fp32,auto,bfloat16,auto@emulated] [KEY VALUE ...]

Runs ``--iters`` training steps (after ``--warmup`` untimed ones) with evaluation and
checkpointing off, and prints the median and mean s/iter. CPU time counts all threads of the
process, so on a busy machine it is the steadier of the two figures.

``--amp`` measures several precisions in one run (so their ratios are comparable on a busy
machine): ``fp32`` (AMP off), or a ``SOLVER.AMP.DTYPE`` (``auto``, ``float16``, ``bfloat16``);
a suffix ``@emulated`` / ``@native`` makes the CPU count as without / with native bf16
(``SEGCLIP_CPU_NATIVE_BF16``), to see what ``auto`` picks on other CPUs. Each line gives the
ratio to the first variant.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from detectron2.engine import HookBase

import segclip_d2  # noqa: F401
import segclip_d2.modeling.meta_arch  # noqa: F401
from segclip_d2.config import load_config

from ..utils.hardware import NATIVE_BF16_ENV
from .trainer import SegCLIPTrainer, amp_dtype_for


class _StepTimer(HookBase):
    def __init__(self, warmup: int):
        self.warmup = warmup
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def before_step(self):
        self._t = (time.perf_counter(), time.process_time())

    def after_step(self):
        if self.trainer.iter - self.trainer.start_iter >= self.warmup:
            self.wall.append(time.perf_counter() - self._t[0])
            self.cpu.append(time.process_time() - self._t[1])


def benchmark(cfg, iters: int, warmup: int) -> dict:
    cfg = cfg.clone()
    cfg.defrost()
    cfg.SOLVER.MAX_ITER = iters + warmup
    cfg.SOLVER.CHECKPOINT_PERIOD = 10**9
    cfg.DATASETS.TEST = ()
    cfg.TEST.EVAL_PERIOD = 0
    cfg.freeze()
    trainer = SegCLIPTrainer(cfg)
    trainer.resume_or_load(resume=False)
    timer = _StepTimer(warmup)
    trainer.register_hooks([timer])
    trainer.train()
    return {
        "iters": len(timer.wall),
        "wall_median": statistics.median(timer.wall),
        "wall_mean": statistics.mean(timer.wall),
        "cpu_median": statistics.median(timer.cpu),
        "threads": torch.get_num_threads(),
    }


def _variant_opts(variant: str) -> tuple[list[str], str | None]:
    """``"bfloat16@emulated"`` -> (config opts, SEGCLIP_CPU_NATIVE_BF16 value or None)."""
    name, _, cpu = variant.partition("@")
    native = {"": None, "native": "1", "emulated": "0"}.get(cpu)
    if native is None and cpu:
        raise SystemExit(f"--amp {variant}: the suffix must be @native or @emulated")
    if name == "fp32":
        return ["SOLVER.AMP.ENABLED", "False"], native
    if name not in ("auto", "float16", "bfloat16"):
        raise SystemExit(f"--amp {variant}: use fp32, auto, float16 or bfloat16")
    return ["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.DTYPE", name], native


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--amp", default=None, help="comma-separated precisions to compare, e.g. fp32,auto (doc)"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    cfg = load_config(args.config_file, args.opts)  # the one safe config reader
    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    variants = args.amp.split(",") if args.amp else [None]
    for variant in variants:
        if variant is not None:
            _variant_opts(variant)  # every name checked before the first run
    results = []
    for variant in variants:
        run_cfg = cfg.clone()
        env_before = os.environ.get(NATIVE_BF16_ENV)
        label = "config"
        if variant is not None:
            opts, native = _variant_opts(variant)
            run_cfg.merge_from_list(opts)
            label = variant
            if native is not None:
                os.environ[NATIVE_BF16_ENV] = native
        try:
            dtype = amp_dtype_for(run_cfg, "cuda" if torch.cuda.is_available() else "cpu")
            with tempfile.TemporaryDirectory() as tmp:
                run_cfg.OUTPUT_DIR = tmp
                res = benchmark(run_cfg, args.iters, args.warmup)
        finally:
            if env_before is None:
                os.environ.pop(NATIVE_BF16_ENV, None)
            else:
                os.environ[NATIVE_BF16_ENV] = env_before
        res["variant"] = label
        res["dtype"] = str(dtype).replace("torch.", "") if dtype else "float32"
        results.append(res)
    crop = tuple(cfg.INPUT.CROP.SIZE)
    base = results[0]
    for res in results:
        print(
            f"{args.config_file} [{res['variant']}: trains in {res['dtype']}]: batch "
            f"{cfg.SOLVER.IMS_PER_BATCH}, crop {crop}, {res['threads']} threads, "
            f"{res['iters']} timed iterations: {res['wall_median']:.2f} s/iter wall (median; "
            f"mean {res['wall_mean']:.2f}), {res['cpu_median']:.2f} CPU-s/iter; "
            f"x{res['wall_median'] / base['wall_median']:.2f} of {base['variant']}"
        )
    return results if args.amp else results[0]


if __name__ == "__main__":
    main()
