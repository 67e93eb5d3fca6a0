"""Measure training seconds per iteration of a config (wall clock and process CPU time).

    python -m segclip_d2.engine.benchmark --config-file configs/synthetic/segclip_cpu.yaml \
        --iters 10 [KEY VALUE ...]

Runs ``--iters`` training steps (after ``--warmup`` untimed ones) with evaluation and
checkpointing off, and prints the median and mean s/iter. CPU time counts all threads of the
process, so on a busy machine it is the steadier of the two figures.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from detectron2.config import get_cfg
from detectron2.engine import HookBase

import segclip_d2  # noqa: F401
import segclip_d2.modeling.meta_arch  # noqa: F401
from segclip_d2 import add_segclip_config

from .trainer import SegCLIPTrainer


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    cfg = add_segclip_config(get_cfg())
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        cfg.OUTPUT_DIR = tmp
        res = benchmark(cfg, args.iters, args.warmup)
    crop = tuple(cfg.INPUT.CROP.SIZE)
    print(
        f"{args.config_file}: batch {cfg.SOLVER.IMS_PER_BATCH}, crop {crop}, "
        f"{res['threads']} threads, {res['iters']} timed iterations: "
        f"{res['wall_median']:.2f} s/iter wall (median; mean {res['wall_mean']:.2f}), "
        f"{res['cpu_median']:.2f} CPU-s/iter"
    )
    return res


if __name__ == "__main__":
    main()
