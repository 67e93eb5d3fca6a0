#!/usr/bin/env python
"""Train and evaluate SegCLIP (detectron2, Mask2Former style).

    python train_net.py --config-file configs/synthetic/segclip_cpu.yaml --num-gpus 1 \
        OUTPUT_DIR output/synthetic_cpu
    python train_net.py --config-file configs/loveda/segclip_R50.yaml --num-gpus 4 [--resume]
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/.../model_best.pth

``--num-gpus N`` starts N processes: one per GPU (NCCL) or, without CUDA, N CPU processes (gloo).
After training or evaluation the per-class IoU table and mIoU are logged and a colour
prediction of the first validation tile is written to ``OUTPUT_DIR/predictions/``.
"""

from __future__ import annotations

import logging
import os

import torch
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import segclip_d2  # noqa: F401  (registers datasets)
import segclip_d2.modeling.meta_arch  # noqa: F401  (registers SegCLIP)
from segclip_d2 import add_segclip_config, compat
from segclip_d2.cli import add_inference_arguments, apply_inference_arguments
from segclip_d2.engine import SegCLIPTrainer, launch, write_color_prediction
from segclip_d2.utils.checkpoint import InferenceCheckpointer

logger = logging.getLogger("segclip_d2.train_net")


class Trainer(SegCLIPTrainer):
    """The project's trainer (see :mod:`segclip_d2.engine.trainer`)."""


def setup(args):
    """Config = defaults + SegCLIP keys + ``--config-file`` + command-line opts."""
    cfg = get_cfg()
    add_segclip_config(cfg)
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts or [])
    apply_inference_arguments(cfg, args)  # --tta / --precision for the evaluation
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
        device_note = "MODEL.DEVICE is cuda but CUDA is not available: using cpu"
    else:
        device_note = None
    cfg.freeze()
    compat.default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="segclip_d2")
    if device_note:
        logger.warning(device_note)
    return cfg


def _summarise(cfg, results) -> None:
    if not comm.is_main_process() or not results:
        return
    per_dataset = results if len(cfg.DATASETS.TEST) > 1 else {cfg.DATASETS.TEST[0]: results}
    for name, res in per_dataset.items():
        sem = res.get("sem_seg", {}) if isinstance(res, dict) else {}
        if "mIoU" in sem:
            logger.info(f"{name}: mIoU = {sem['mIoU']:.2f}")


def _write_prediction(cfg, model) -> None:
    if comm.is_main_process() and len(cfg.DATASETS.TEST):
        path = write_color_prediction(cfg, model, cfg.DATASETS.TEST[0])
        logger.info(f"Colour prediction of the first tile of {cfg.DATASETS.TEST[0]}: {path}")


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        # every parameter must come from the checkpoint (clear error otherwise)
        InferenceCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        _summarise(cfg, results)
        _write_prediction(cfg, model)
        return results

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    results = trainer.train()
    results = results if results is not None else getattr(trainer, "_last_eval_results", None)
    _summarise(cfg, results)
    _write_prediction(cfg, trainer.model)
    comm.synchronize()
    return results


def build_parser():
    parser = default_argument_parser()
    parser.set_defaults(dist_url="auto")
    add_inference_arguments(parser)
    return parser


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    args = build_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
