"""SegCLIP's detectron2 trainer (Mask2Former style, working on detectron2 0.5 and current).

Compared to ``DefaultTrainer`` it builds: the project's mappers and evaluator, a seeded and
resumable training loader, AdamW with backbone/norm/embedding parameter groups, the poly LR
schedule, full-model gradient clipping, AMP (``SOLVER.AMP.DTYPE``), DDP for CPU processes,
a best-checkpoint hook, and writers that need no tensorboard.
"""

from __future__ import annotations

import logging
import os
import weakref

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.engine import DefaultTrainer, TrainerBase, hooks
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.events import EventStorage
from detectron2.utils.logger import setup_logger

from .. import compat
from ..checkpoint.card import build_model_card, card_config_fields
from ..checkpoint.checkpointer import explain_weight_fetch_errors
from ..data.bands import display_rgb
from ..data.dataset_facts import get_facts
from ..data.evaluator import build_evaluator as build_segclip_evaluator
from ..data.mapper import build_test_mapper, build_train_mapper
from ..errors import UserError
from ..predict import SegInferencer, SegmentorWithInference
from ..predict.optimize import channels_last_input, inference_copy
from ..utils.atomic import atomic_output
from ..utils.events import LazyJSONWriter
from ..utils.hardware import EMULATED_BF16_SLOWDOWN, native_bf16_reason
from .checkpointer import TrainingCheckpointer
from .data import ResumableTrainLoader, build_train_loader
from .hooks import BestCheckpointer
from .lr_scheduler import build_lr_scheduler
from .optimizer import build_gradient_clipper, build_optimizer
from .report import CurvesWriter, TrainingLogPrinter, compose_panel
from .train_loop import SegCLIPTrainLoop

logger = logging.getLogger(__name__)


AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def amp_dtype_for(cfg, device_type: str) -> torch.dtype | None:
    """The autocast dtype of ``SOLVER.AMP`` on ``device_type``, or None for fp32 (logged).

    ``DTYPE auto``: fp16 on CUDA; on CPU bf16 where the CPU computes it natively, else fp32 (a
    CPU without AVX512-BF16/AMX emulates bf16 many times slower than fp32). An explicit
    ``bfloat16`` on such a CPU trains, with a warning; ``float16`` on CPU is CPU fp16 autocast
    with a GradScaler, the CUDA AMP path run where there is no GPU.
    """
    if not cfg.SOLVER.AMP.ENABLED:
        return None
    name = str(cfg.SOLVER.AMP.DTYPE).lower()
    if name != "auto" and name not in AMP_DTYPES:
        raise UserError(
            "SOLVER.AMP.DTYPE",
            f"unknown value {cfg.SOLVER.AMP.DTYPE!r}",
            "use auto, float16 or bfloat16",
        )
    if device_type == "cuda":
        return torch.float16 if name == "auto" else AMP_DTYPES[name]
    native, why = native_bf16_reason()
    if name == "auto":
        if native:
            logger.info(f"SOLVER.AMP.DTYPE auto on CPU: bf16 autocast (native bf16: {why})")
            return torch.bfloat16
        logger.info(
            f"SOLVER.AMP.DTYPE auto on CPU: training in fp32 (no native bf16: {why}; emulated "
            f"bf16 would be about {EMULATED_BF16_SLOWDOWN}x slower)"
        )
        return None
    if name == "bfloat16" and not native:
        logger.warning(
            f"SOLVER.AMP.DTYPE bfloat16 on a CPU without native bf16 ({why}): expect training "
            f"to be about {EMULATED_BF16_SLOWDOWN}x slower than fp32; DTYPE auto trains in fp32 "
            "here"
        )
    if name == "float16":
        logger.info("SOLVER.AMP.DTYPE float16 on CPU: CPU fp16 autocast with a GradScaler")
    return AMP_DTYPES[name]


def freeze_disabled_modules(cfg, model: torch.nn.Module) -> list[str]:
    """Freeze the trainable parameters of modules the config switches off; returns their names.

    With ``MODEL.SEGCLIP.CFF_ENABLED False`` a model that still builds the CFF module never uses
    it: DDP (created without ``find_unused_parameters``, which costs a graph walk every step)
    would fail on the second iteration waiting for its gradients. Frozen, DDP and the optimizer
    leave them out. A model that does not build the module has nothing to freeze.
    """
    disabled = []
    if not cfg.MODEL.SEGCLIP.CFF_ENABLED:
        disabled.append("cff")
    names, modules = [], []
    for mod_name, module in model.named_modules():
        if mod_name.split(".")[-1] not in disabled:
            continue
        params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        for p_name, p in params:
            p.requires_grad_(False)
            names.append(f"{mod_name}.{p_name}")
        if params:
            modules.append(mod_name)
    if names:
        logger.info(
            f"Switched off by the config, frozen (not trained, no DDP gradient): {len(names)} "
            f"parameters of {', '.join(modules)}"
        )
    return names


def has_tensorboard() -> bool:
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class SegCLIPTrainer(DefaultTrainer):
    """Trainer for SegCLIP (see module doc). ``resume_or_load`` then ``train``."""

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())

        model = self.build_model(cfg)
        freeze_disabled_modules(cfg, model)  # DDP: no unused trainable parameter
        if next(model.parameters()).device.type == "cpu":
            channels_last_input(model)  # an execution choice, measured: see the function
        optimizer = self.build_optimizer(cfg, model)
        self._train_loader = ResumableTrainLoader(
            lambda start_iter: self.build_train_loader(cfg, start_iter)
        )
        device_type = next(model.parameters()).device.type
        model = compat.create_ddp_model(model, broadcast_buffers=False)
        self._trainer = SegCLIPTrainLoop(
            model,
            self._train_loader,
            optimizer,
            grad_clipper=build_gradient_clipper(cfg),
            amp_dtype=amp_dtype_for(cfg, device_type),
            seed=cfg.SEED,
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self._card_config = card_config_fields(cfg)  # the card's config part, read once
        self.checkpointer = TrainingCheckpointer(
            model, cfg.OUTPUT_DIR, card_fn=self._model_card, trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        if comm.is_main_process() and cfg.OUTPUT_DIR:
            os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        self.register_hooks(self.build_hooks())

    # ------------------------------------------------------------------ the loop
    def train(self):
        """Run the training; returns the last evaluation's results (or None).

        detectron2's loop, except on an exception: then only the hooks that neither save nor
        evaluate finish (no ``model_final.pth``, no evaluation of a diverged model), and a
        :class:`~segclip_d2.errors.UserError` (divergence, disk full, corrupt label) is not
        logged with a traceback; the entry point prints its one line.
        """
        self._run_loop(self.start_iter, self.max_iter)
        results = getattr(self, "_last_eval_results", None)
        self._restamp_final_checkpoint()
        if len(self.cfg.TEST.EXPECTED_RESULTS) and comm.is_main_process() and results:
            verify_results(self.cfg, results)
        return results

    def _run_loop(self, start_iter: int, max_iter: int) -> None:
        logger.info(f"Starting training from iteration {start_iter}")
        self.iter = self.start_iter = start_iter
        self.max_iter = max_iter
        with EventStorage(start_iter) as self.storage:
            try:
                self.before_train()
                for self.iter in range(start_iter, max_iter):
                    self.before_step()
                    self.run_step()
                    self.after_step()
                self.iter += 1  # == max_iter: the hooks' after_train see a finished run
            except Exception as e:
                if not isinstance(e, UserError):
                    logger.exception("Exception during training:")
                self._after_failed_train()
                raise
            self.after_train()

    def _restamp_final_checkpoint(self) -> None:
        """Write ``model_final.pth`` once more after the final evaluation, so its card carries
        the metrics of its own weights: detectron2's checkpointer writes it before that
        evaluation runs (so a crash there still leaves the weights), with the previous one."""
        storage = getattr(self, "storage", None)
        final = os.path.join(self.cfg.OUTPUT_DIR, "model_final.pth")
        if not comm.is_main_process() or storage is None or not os.path.isfile(final):
            return
        evaluated = [it for k, (_, it) in storage.latest().items() if k.startswith("sem_seg/")]
        if not evaluated or max(evaluated) < self.max_iter:  # no evaluation after the save
            return
        self.iter = self.max_iter - 1  # the trainer state model_final was written with
        try:
            self.checkpointer.save("model_final", iteration=self.iter)
        finally:
            self.iter = self.max_iter

    def _after_failed_train(self) -> None:
        """``after_train`` of the hooks that neither checkpoint nor evaluate (timer, writers)."""
        self.storage.iter = self.iter
        skip = (hooks.PeriodicCheckpointer, hooks.EvalHook, BestCheckpointer)
        for h in self._hooks:
            if not isinstance(h, skip):
                h.after_train()

    # ------------------------------------------------------------------ state
    def resume_or_load(self, resume: bool = True):
        with explain_weight_fetch_errors(self.cfg.MODEL.WEIGHTS):
            super().resume_or_load(resume=resume)
        self._train_loader.start_iter = self.start_iter

    def state_dict(self):
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logger.warning("checkpoint has no optimizer state (written by detectron2 0.5?)")

    def _model_card(self, extra: dict) -> dict:
        """The model card saved in every checkpoint: the latest evaluation metrics of this run
        (``best_metric`` for model_best.pth) and the iteration."""
        metrics = {}
        storage = getattr(self, "storage", None)
        if storage is not None:
            for key, (value, it) in storage.latest().items():
                if key.startswith("sem_seg/"):
                    metrics[key] = float(value)
                    # the final evaluation runs at max_iter, on the weights of max_iter - 1
                    metrics["evaluated_at_iteration"] = min(int(it), self.max_iter - 1)
        if "best_metric" in extra:
            metrics[f"best {self.cfg.SOLVER.BEST_CHECKPOINT_METRIC}"] = float(extra["best_metric"])
        return build_model_card(
            self.cfg, self.model, metrics, extra.get("iteration"), self._card_config
        )

    # ------------------------------------------------------------------ builders
    @classmethod
    def build_train_loader(cls, cfg, start_iter: int = 0):
        return build_train_loader(cfg, build_train_mapper(cfg), start_iter=start_iter)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(
            cfg, dataset_name, mapper=build_test_mapper(cfg, dataset_name)
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_segclip_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Evaluate an inference-optimised copy of ``model``
        (:func:`~segclip_d2.predict.optimize.optimize_for_inference`), so that periodic
        evaluation leaves the training model plain; a model already optimised (``train_net
        --eval-only``) is evaluated as it is. The copy runs through ``TEST.MODE`` / ``TEST.TTA``
        (:class:`~segclip_d2.predict.SegmentorWithInference`)."""
        device = next(model.parameters()).device
        fast = inference_copy(model, device, cfg.TEST.PRECISION)
        return super().test(cfg, SegmentorWithInference(fast, SegInferencer(cfg)), evaluators)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)

    def build_writers(self):
        writers = [
            TrainingLogPrinter(self.max_iter),
            LazyJSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json")),
        ]
        if has_tensorboard():
            from detectron2.utils.events import TensorboardXWriter

            writers.append(TensorboardXWriter(self.cfg.OUTPUT_DIR))
        return writers

    def build_hooks(self):
        cfg = self.cfg
        ret = [hooks.IterationTimer(), hooks.LRScheduler()]
        if comm.is_main_process():
            ret.append(hooks.PeriodicCheckpointer(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD))

        def test_and_save_results():
            self._last_eval_results = self.test(self.cfg, self.model)
            return self._last_eval_results

        if len(cfg.DATASETS.TEST):
            ret.append(hooks.EvalHook(cfg.TEST.EVAL_PERIOD, test_and_save_results))
            if cfg.SOLVER.BEST_CHECKPOINT_METRIC and comm.is_main_process():
                ret.append(
                    BestCheckpointer(
                        cfg.TEST.EVAL_PERIOD, self.checkpointer, cfg.SOLVER.BEST_CHECKPOINT_METRIC
                    )
                )
        if comm.is_main_process():
            ret.append(
                CurvesWriter(cfg.OUTPUT_DIR, cfg.TEST.EVAL_PERIOD if len(cfg.DATASETS.TEST) else 0)
            )
            ret.append(hooks.PeriodicWriter(self.build_writers(), period=20))
        return ret


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def write_color_prediction(cfg, model: torch.nn.Module, dataset_name: str, index: int = 0):
    """Predict tile ``index`` of ``dataset_name`` and write, in ``<OUTPUT_DIR>/predictions/``,
    ``<stem>_color.png`` (the prediction in the dataset's colours) and ``<stem>_panel.png``
    (image | ground truth | prediction with a legend). Returns the panel's path."""
    import cv2

    dicts = DatasetCatalog.get(dataset_name)
    if not dicts:
        raise ValueError(f"dataset {dataset_name!r} is empty")
    record = dicts[index]
    inputs = build_test_mapper(cfg, dataset_name)(record)
    model = unwrap_model(model)
    was_training = model.training
    model.eval()
    try:
        probs = model([inputs])[0]["sem_seg"]  # (K, H, W)
    finally:
        model.train(was_training)
    pred = probs.argmax(0).to(torch.uint8).cpu().numpy()  # (H, W)
    meta = MetadataCatalog.get(dataset_name)
    facts = get_facts(meta.dataset_key)
    out_dir = os.path.join(cfg.OUTPUT_DIR, "predictions")
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(record["file_name"]))[0]
    image = display_rgb(inputs["image"].permute(1, 2, 0).cpu().numpy(), cfg.INPUT.BANDS)  # RGB
    gt = inputs["sem_seg"].cpu().numpy() if "sem_seg" in inputs else None
    if image.shape[:2] != pred.shape:  # the model predicts at the original size
        image = cv2.resize(image, pred.shape[::-1], interpolation=cv2.INTER_LINEAR)
        if gt is not None:
            gt = cv2.resize(gt.astype(np.uint8), pred.shape[::-1], interpolation=cv2.INTER_NEAREST)
    outputs = {
        "color": facts.colorize(pred),  # (H, W, 3) RGB
        "panel": compose_panel(image, gt, pred, facts),
    }
    for kind, rgb in outputs.items():
        path = os.path.join(out_dir, f"{stem}_{kind}.png")
        with atomic_output(path) as tmp:
            if not cv2.imwrite(str(tmp), np.ascontiguousarray(rgb[:, :, ::-1])):
                raise OSError(f"could not write {tmp}")
    return path
