#!/usr/bin/env python
"""Train and evaluate SegCLIP (detectron2, Mask2Former style).

    python train_net.py --config-file configs/synthetic/segclip_cpu.yaml --num-gpus 1 \
        OUTPUT_DIR output/synthetic_cpu
    python train_net.py --config-file configs/loveda/segclip_R50.yaml --num-gpus 4 [--resume]
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/.../model_best.pth

``--num-gpus N`` starts N processes: one per GPU (NCCL) or, without CUDA, N CPU processes (gloo).
After training or evaluation the per-class IoU table and mIoU are logged and a colour
prediction of the first validation tile is written to ``OUTPUT_DIR/predictions/``.

Errors follow :mod:`segclip_d2.errors`: a bad command line, config file, key, value, dataset,
weights file or output folder is one line ``error: <file or key>: <what>; <what to do>`` and
exit status 2, found by :func:`preflight` before anything is built or written (under
``--num-gpus N`` once, in the launching process). ``--eval-only`` refuses a model without
trained weights unless ``--allow-random-weights``.
"""

from __future__ import annotations

# First, before detectron2: segclip_d2 imports it with its import-time torch.jit.script
# deprecation warnings silenced (segclip_d2/quiet.py); it also registers the datasets.
import segclip_d2  # noqa: F401

# isort: split
import logging
import os
import sys

import torch
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import segclip_d2.modeling.meta_arch  # noqa: F401  (registers SegCLIP)
from segclip_d2 import add_segclip_config, compat
from segclip_d2.cli import add_inference_arguments, apply_inference_arguments
from segclip_d2.config import load_config
from segclip_d2.data.custom import apply_custom_dataset
from segclip_d2.engine import SegCLIPTrainer, write_color_prediction
from segclip_d2.engine.data import check_labels_not_all_ignored
from segclip_d2.errors import (
    UserError,
    check_dataset_present,
    check_datasets,
    check_trained_weights,
    check_weights_file,
    check_writable_dir,
    contract_parser,
    run_main,
)
from segclip_d2.launch import detect_launch_env, launch
from segclip_d2.predict.load import load_model

logger = logging.getLogger("segclip_d2.train_net")


class Trainer(SegCLIPTrainer):
    """The project's trainer (see :mod:`segclip_d2.engine.trainer`)."""


def build_config(args):
    """Config = defaults + SegCLIP keys + ``--config-file`` + command-line opts (not frozen);
    a :class:`UserError` naming the file or key when any of them is wrong."""
    cfg = get_cfg()
    add_segclip_config(cfg)
    load_config(args.config_file, args.opts or [], cfg=cfg)
    apply_custom_dataset(cfg)  # DATASETS.CUSTOM: datasets, bands, statistics from dataset.yaml
    apply_inference_arguments(cfg, args)  # --tta / --precision for the evaluation
    return cfg


def world_size_of(args) -> int:
    """Processes the run will use: torchrun/SLURM's world size, else --num-gpus x machines."""
    env = detect_launch_env()
    return env.world_size if env.source != "none" else args.num_gpus * args.num_machines


def _resumable(cfg, args) -> bool:
    """``--resume`` will load a checkpoint of OUTPUT_DIR."""
    return bool(args.resume) and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))


def check_flags_before_overrides(opts) -> None:
    """A ``--flag`` among the KEY VALUE overrides (detectron2 reads everything after the first
    KEY as overrides): say where it belongs instead of "odd number of items"."""
    late = [o for o in opts or [] if str(o).startswith("--")]
    if late:
        raise UserError(
            "command line",
            f"{late[0]} comes after the KEY VALUE overrides, where it is read as a config key",
            f"put the flags before the overrides: train_net.py --config-file FILE {late[0]} "
            "[...] KEY VALUE ...",
        )


def check_no_earlier_training(cfg, args) -> None:
    """Training without ``--resume`` into an OUTPUT_DIR that holds checkpoints would replace
    its model_final.pth / model_best.pth: refused."""
    out = cfg.OUTPUT_DIR
    if args.resume or not os.path.isdir(out):
        return
    names = sorted(n for n in os.listdir(out) if n.endswith(".pth") or n == "last_checkpoint")
    if names:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise UserError(
            f"OUTPUT_DIR {out}",
            f"holds an earlier training ({shown}) that this run would overwrite",
            "add --resume (before the KEY VALUE overrides) to continue it, or train into a fresh "
            "OUTPUT_DIR",
        )


def _check_train_values(cfg, args) -> None:
    world, batch = world_size_of(args), cfg.SOLVER.IMS_PER_BATCH
    if batch <= 0:
        raise UserError("SOLVER.IMS_PER_BATCH", f"is {batch}, must be > 0", "e.g. 16")
    if batch % world:
        raise UserError(
            "SOLVER.IMS_PER_BATCH",
            f"{batch} images cannot be split evenly over {world} processes",
            f"use a multiple of {world}, or another --num-gpus",
        )
    if cfg.SOLVER.MAX_ITER <= 0:
        raise UserError("SOLVER.MAX_ITER", f"is {cfg.SOLVER.MAX_ITER}, must be > 0", None)


def preflight(args, cfg=None):
    """Every check that needs no model, before anything is built or written: command line,
    config (file, keys, values), dataset names, folders and labels, batch size vs. world size,
    weights file, output folder (no earlier training overwritten). Returns the (unfrozen)
    config."""
    if args.num_gpus < 1 or args.num_machines < 1:
        raise UserError("--num-gpus", "must be >= 1 (also --num-machines)", "e.g. --num-gpus 1")
    check_flags_before_overrides(args.opts)
    cfg = build_config(args) if cfg is None else cfg
    train = not args.eval_only
    if train:
        if not cfg.DATASETS.TRAIN:
            raise UserError("DATASETS.TRAIN", "empty", "name the training split(s)")
        check_datasets(cfg.DATASETS.TRAIN, "DATASETS.TRAIN")
    elif not cfg.DATASETS.TEST:
        raise UserError("DATASETS.TEST", "empty: --eval-only has nothing to evaluate", None)
    check_datasets(cfg.DATASETS.TEST, "DATASETS.TEST")
    if train:
        _check_train_values(cfg, args)
    check_weights_file(cfg.MODEL.WEIGHTS)
    if args.eval_only:
        check_trained_weights(cfg.MODEL.WEIGHTS, args.allow_random_weights, _resumable(cfg, args))
    check_writable_dir(cfg.OUTPUT_DIR, "OUTPUT_DIR")
    if train:
        check_no_earlier_training(cfg, args)
    # Last: listing a split reads its folder (and generates the synthetic set on first use).
    # TEST first: a missing prepared split is reported before the synthetic set is generated.
    for key in ("DATASETS.TEST", "DATASETS.TRAIN") if train else ("DATASETS.TEST",):
        for name in cfg.get("DATASETS")[key.split(".")[1]]:
            check_dataset_present(name, key)
    if train:
        for name in cfg.DATASETS.TRAIN:
            check_labels_not_all_ignored(name, "DATASETS.TRAIN")
    return cfg


def setup(args):
    """The checked config, frozen; logging and the config dump in OUTPUT_DIR."""
    cfg = build_config(args)
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
        logger.info(
            f"Prediction of the first tile of {cfg.DATASETS.TEST[0]} (image | ground truth | "
            f"prediction): {path}"
        )


def main(args):
    cfg = setup(args)
    if args.eval_only:
        # the one loader: safe reading, every parameter from the checkpoint, finite weights
        _, model = load_model(
            cfg=cfg,
            device=cfg.MODEL.DEVICE,
            precision=None,
            allow_random_weights=getattr(args, "allow_random_weights", False),
            resume_dir=cfg.OUTPUT_DIR if args.resume else None,
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
    parser = contract_parser(default_argument_parser())
    parser.set_defaults(dist_url="auto")
    add_inference_arguments(parser)
    parser.add_argument(
        "--allow-random-weights",
        action="store_true",
        help="let --eval-only evaluate a model without trained weights (meaningless scores)",
    )
    return parser


def _worker(args):
    """``main`` in a launched process: a user error is printed by rank 0 only, exit 2."""
    try:
        return main(args)
    except UserError as err:
        if comm.get_rank() == 0:
            from segclip_d2.errors import report

            report(err)
        sys.exit(2)


def cli(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        preflight(args)
    except UserError:
        if detect_launch_env().rank != 0:  # torchrun / srun start every rank: rank 0 reports
            return 2
        raise
    print("Command Line Args:", args)
    try:
        launch(
            _worker,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    except SystemExit as e:  # single process: _worker's exit status
        return int(e.code or 0)
    except Exception as e:  # a worker process ended with the user-error status: printed there
        if getattr(e, "exit_code", None) == 2:
            return 2
        raise
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    sys.exit(run_main(cli))
