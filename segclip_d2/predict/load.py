"""The one way to get a ready model: config, weights, device and precision in; a built, loaded,
optimised model (:func:`load_model`) or a predictor of class maps (:func:`build_predictor`) out.

train_net.py ``--eval-only``, the demo, the ONNX export, the benchmarks and the GPU acceptance
check all call this module, so every one of them reads files the same safe way:

* the config is parsed once with the safe YAML loader (:func:`segclip_d2.config.load_config`);
  it comes from a YAML file, from the model card of the weights (``config_file=None``) or from
  the model card of an exported ``.onnx`` file;
* the weights are read by :func:`segclip_d2.checkpoint.files.read_checkpoint` (no pickle runs
  code; ``.pkl`` only as plain arrays), must fit the model exactly
  (:class:`~segclip_d2.checkpoint.checkpointer.InferenceCheckpointer`) and must be finite;
* a model without weights is refused unless ``allow_random_weights``.

Every problem is a :class:`~segclip_d2.errors.UserError` naming the file (one line, exit 2).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Sequence

import numpy as np
import torch

from ..checkpoint.card import CARD_KEY, check_card, read_onnx_card
from ..checkpoint.files import check_finite, detectron2_layout, read_checkpoint
from ..config.load import load_config, load_config_text
from ..errors import UserError, check_trained_weights, check_weights_file
from ..utils.bands import input_values
from .blocks import ClassPredictor
from .inferencer import SegInferencer
from .precision import effective_precision

logger = logging.getLogger(__name__)


def _local(weights) -> bool:
    return bool(weights) and ("://" not in str(weights) or str(weights).startswith("file://"))


def _config(config_file, opts, cfg, checkpoint):
    """The unfrozen config, and the model card read while finding it or None. ``checkpoint``:
    the content of the weights, when already read."""
    if cfg is not None:
        if opts:
            raise ValueError("merge opts into cfg before passing it")
        cfg = cfg.clone()
        cfg.defrost()
        return cfg, None
    if config_file and str(config_file).endswith(".onnx"):
        card = read_onnx_card(str(config_file))
        source = f"{config_file} (its model card's config)"
        return load_config_text(card.get("config") or "", source, opts), card
    if config_file:
        return load_config(str(config_file), opts), None
    if checkpoint is None:
        raise UserError("--config-file", "missing", "pass a config, or weights with a model card")
    path, data = checkpoint
    card = data.get(CARD_KEY)
    if card is None or not card.get("config"):
        raise UserError(path, "has no model card with a config", "pass --config-file")
    check_card(card, path)
    return load_config_text(card["config"], f"{path} (its model card's config)", opts), card


def _read_weights(weights) -> tuple[str, dict] | None:
    """(path, content) of local ``weights``, read once, before anything is built: a file that
    is refused (code, corruption, non-finite values) fails fast."""
    if not _local(weights):
        return None
    path = str(weights).removeprefix("file://")
    check_weights_file(path)
    data = read_checkpoint(path)
    check_finite(detectron2_layout(data, path)["model"], path)
    return path, data


def _device(device, cfg) -> str:
    """``device``, or the config's MODEL.DEVICE (cpu, with a warning, when CUDA is missing)."""
    cuda = torch.cuda.is_available()
    if device is None:
        device = str(cfg.MODEL.DEVICE)
        if device.startswith("cuda") and not cuda:
            logger.warning("MODEL.DEVICE is %s but CUDA is not available: using cpu", device)
            return "cpu"
    if str(device).startswith("cuda") and not cuda:
        raise UserError(f"device {device}", "CUDA is not available on this machine", "use cpu")
    return str(device)


def _build(cfg, weights: str, resume_dir: str | None, checkpoint=None):
    """The model of ``cfg`` in eval mode with ``weights`` (or the newest intact checkpoint of
    ``resume_dir``) loaded; returns (model, model card or None)."""
    from detectron2.modeling import build_model

    import segclip_d2.modeling.backbone  # noqa: F401  (registers the backbones)
    import segclip_d2.modeling.meta_arch  # noqa: F401  (registers SegCLIP)
    from segclip_d2.checkpoint.checkpointer import InferenceCheckpointer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # a random model (allow_random_weights) is the same every run
        model = build_model(cfg)
    model.eval()
    if not weights and not resume_dir:
        logger.warning("MODEL.WEIGHTS is empty: the model is randomly initialised")
        return model, None
    preloaded = dict([checkpoint]) if checkpoint else None
    checkpointer = InferenceCheckpointer(model, save_dir=resume_dir or "", preloaded=preloaded)
    checkpointer.resume_or_load(weights, resume=bool(resume_dir))
    return model, checkpointer.card


def _load(config_file, weights, *, opts, device, precision, optimize, allow_random_weights,
          cfg=None, resume_dir=None):  # fmt: skip
    resumable = bool(resume_dir) and os.path.isfile(os.path.join(resume_dir, "last_checkpoint"))
    checkpoint = _read_weights(weights) if weights is not None and not resumable else None
    cfg, card = _config(config_file, opts, cfg, checkpoint)
    if weights is not None:
        cfg.MODEL.WEIGHTS = str(weights)
    elif not resumable:
        checkpoint = _read_weights(cfg.MODEL.WEIGHTS)
    cfg.MODEL.DEVICE = _device(device, cfg)
    if precision is not None:
        cfg.TEST.PRECISION = precision
    cfg.freeze()
    weights = cfg.MODEL.WEIGHTS
    check_weights_file(weights)
    check_trained_weights(weights, allow_random_weights, resumable)
    model, loaded_card = _build(cfg, weights, resume_dir if resumable else None, checkpoint)
    if optimize:
        from .optimize import optimize_for_inference

        model = optimize_for_inference(model, cfg.MODEL.DEVICE, cfg.TEST.PRECISION)
    else:
        model.to(cfg.MODEL.DEVICE)
    return cfg, model, loaded_card or card


def load_model(
    config_file: str | None = None,
    weights: str | None = None,
    *,
    opts: Sequence[str] = (),
    device: str | None = "cpu",
    precision: str | None = "auto",
    optimize: bool = True,
    allow_random_weights: bool = False,
    cfg=None,
    resume_dir: str | None = None,
):
    """``(cfg, model)``: the model built from a config, its weights loaded, in eval mode,
    optimised for inference (``optimize``), on ``device``.

    Args:
        config_file: a YAML config; an exported ``.onnx`` (the config in its model card); or
            None: the config in the model card of ``weights``.
        weights: a checkpoint (``.pth``, or ``.pkl`` of plain arrays); None keeps the config's
            ``MODEL.WEIGHTS`` (after ``opts``).
        opts: config overrides ``KEY VALUE ...``.
        device: "cpu", "cuda", "cuda:1"; None: the config's ``MODEL.DEVICE`` (cpu when CUDA is
            not available).
        precision: ``TEST.PRECISION`` ("auto", "fp32", "bf16", "fp16"); None keeps the config's.
        optimize: apply :func:`~segclip_d2.predict.optimize.optimize_for_inference`.
        allow_random_weights: build a randomly initialised model when there are no weights.
        cfg: an already loaded config instead of ``config_file`` (train_net.py's, with its
            command-line flags); it is copied, not changed.
        resume_dir: a training ``OUTPUT_DIR`` whose newest intact checkpoint is loaded instead
            of the weights when it has one (train_net.py ``--eval-only --resume``).
    Returns the frozen config and the model.
    """
    cfg, model, _ = _load(**locals())
    return cfg, model


def _dataset_vocabulary(cfg) -> tuple[list[str], list]:
    from detectron2.data import MetadataCatalog

    names = list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN)
    if not names or names[0] not in MetadataCatalog.list():
        return [], []
    meta = MetadataCatalog.get(names[0])
    return list(meta.get("stuff_classes", None) or []), list(meta.get("stuff_colors", None) or [])


class Predictor:
    """A loaded model as a class-map predictor, with the same call as
    :class:`~segclip_d2.deploy.onnx_predictor.OnnxSegmenter` (so the demo has one flow).

    ``predictor(rgb (h, w, C) uint8/float, valid (h, w) bool or None)`` ->
    ``(ids (h, w) uint8, 255 where not valid; probs (K, h, w) float32 summing to 1, or None for a
    block without a valid pixel)``. Attributes: ``cfg``, ``model``, ``inferencer`` (whole/slide,
    TTA, precision as configured), ``class_names``, ``colors``, ``card`` (the checkpoint's
    model card, ``{}`` when it has none), ``device``, ``precision`` (the effective one),
    ``bands`` (the C input band names, ``INPUT.BANDS``) and ``values`` (what they hold,
    :func:`~segclip_d2.utils.bands.input_values`)."""

    def __init__(self, cfg, model, card: dict | None = None):
        self.cfg, self.model, self.card = cfg, model, dict(card or {})
        self.device = torch.device(cfg.MODEL.DEVICE)
        self.precision = effective_precision(cfg.TEST.PRECISION, self.device.type)
        self.inferencer = SegInferencer(cfg)
        self._predict = ClassPredictor(model.predict_sem_seg_probs, self.inferencer, self.device)
        self.class_names = list(model.class_names)
        self.bands = [str(b).lower() for b in cfg.INPUT.BANDS]
        self.values = input_values(self.bands, cfg.MODEL.PIXEL_MEAN)
        known, colors = _dataset_vocabulary(cfg)
        if self.card.get("class_names") == self.class_names and self.card.get("colors"):
            known, colors = self.card["class_names"], self.card["colors"]
        self.colors = self._colors_for(self.class_names, known, colors)

    @staticmethod
    def _colors_for(names, known, colors) -> list[tuple[int, int, int]]:
        from ..data.visualize import vocabulary_colors

        return vocabulary_colors(names, known, colors)

    def set_vocabulary(self, names: Sequence[str]) -> None:
        """Predict ``names`` instead (text class head only): names of the current vocabulary
        keep their colours, new ones get distinct colours."""
        names = list(names)
        self.model.set_vocabulary(names)
        self.colors = self._colors_for(names, self.class_names, self.colors)
        self.class_names = names

    def predict_probs(self, rgb: np.ndarray) -> np.ndarray:
        """(K, h, w) float32 class probabilities of an (h, w, C) image of the model's bands."""
        return self._predict.predict_probs(rgb)

    def __call__(self, rgb: np.ndarray, valid: np.ndarray | None = None):
        if valid is None:
            valid = np.ones(rgb.shape[:2], dtype=bool)
        return self._predict(rgb, valid)

    def __repr__(self) -> str:
        return (
            f"Predictor({self.cfg.MODEL.META_ARCHITECTURE}, {self.inferencer}, "
            f"device={self.device}, classes={len(self.class_names)})"
        )


def build_predictor(*args, **kwargs) -> Predictor:
    """A :class:`Predictor` of the model :func:`load_model` builds (the same arguments and
    defaults; the signature is :func:`load_model`'s)."""
    bound = inspect.signature(load_model).bind(*args, **kwargs)
    bound.apply_defaults()
    return Predictor(*_load(**bound.arguments))


build_predictor.__signature__ = inspect.signature(load_model).replace(return_annotation="Predictor")
