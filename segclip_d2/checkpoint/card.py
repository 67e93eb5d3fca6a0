"""Model cards: what a trained checkpoint needs to describe itself.

``model_*.pth`` and ``model_best.pth`` written during training carry, next to the weights, a
``"model_card"`` entry (a plain dict of JSON types):

* ``class_names``, ``colors``, ``prompt_template`` and ``prompts`` (one per class);
* ``text_encoder``: the identity of the frozen CLIP text encoder (open_clip model name,
  pretrained value, weights file name and SHA-256, or random init) and ``text_embeddings``, the
  (K, D) class embeddings the model was trained with;
* ``input``: format, ``bands`` (names in file order), ``values`` (``rgb_0_255``: 8-bit RGB, other
  data stretched to it; ``as_read``: the band values unscaled, see :mod:`segclip_d2.utils.bands`),
  ``pixel_mean`` / ``pixel_std`` (one per band), size divisibility;
* ``training``: dataset(s), crop size, ground sample distance ``gsd_m`` (``INPUT.GSD_M``,
  None when unknown), iteration;
* ``metrics``: the latest evaluation results at save time (``sem_seg/mIoU`` ...), when known;
* ``config`` (the full YAML) and ``project_version``.

Loading a checkpoint for inference
(:class:`~segclip_d2.checkpoint.checkpointer.InferenceCheckpointer`) hands the stored embeddings
to the model's text encoder, so the training vocabulary is predicted
without CLIP weights. This module imports only the standard library at module level (the ONNX
path reads cards without torch).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess

from ..utils.bands import RGB_NAMES, input_values

logger = logging.getLogger(__name__)

CARD_KEY = "model_card"
CARD_FORMAT = "segclip-model-card/1"


def project_version() -> str:
    """segclip-d2's version, plus the git commit when running from a checkout."""
    try:
        from importlib.metadata import version

        ver = version("segclip-d2")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        ver = "unknown"
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(
            ["git", "-C", here, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{ver}+g{commit}" if commit else ver


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def card_config_fields(cfg) -> dict:
    """The parts of the card that come from the config alone (input format, training data, crop,
    GSD, test mode, the config itself). A trainer reads them once when it is built."""
    gsd = float(cfg.INPUT.GSD_M)
    return {
        "class_head": cfg.MODEL.SEGCLIP.CLASS_HEAD,
        "input": {
            "format": cfg.INPUT.FORMAT,
            "bands": list(cfg.INPUT.BANDS),
            "values": input_values(cfg.INPUT.BANDS, cfg.MODEL.PIXEL_MEAN),
            "pixel_mean": [float(v) for v in cfg.MODEL.PIXEL_MEAN],
            "pixel_std": [float(v) for v in cfg.MODEL.PIXEL_STD],
            "size_divisibility": int(cfg.MODEL.SEGCLIP.SIZE_DIVISIBILITY),
        },
        "training": {
            "datasets": list(cfg.DATASETS.TRAIN),
            "crop_size": [int(v) for v in cfg.INPUT.CROP.SIZE] if cfg.INPUT.CROP.ENABLED else None,
            "gsd_m": gsd if gsd > 0 else None,
        },
        "test": {"mode": cfg.TEST.MODE, "slide_crop_size": list(cfg.TEST.SLIDE.CROP_SIZE)},
        "config": cfg.dump(),
    }


def build_model_card(
    cfg,
    model,
    metrics: dict | None = None,
    iteration: int | None = None,
    config_fields: dict | None = None,
):
    """The card of ``model`` (a SegCLIP, possibly DDP-wrapped) built from ``cfg`` (or from its
    :func:`card_config_fields`, when already read)."""
    import copy

    import torch
    from detectron2.data import MetadataCatalog

    fields = copy.deepcopy(config_fields or card_config_fields(cfg))
    model = _unwrap(model)
    encoder = model.text_encoder
    names = list(model.class_names)
    datasets = fields["training"]["datasets"]
    meta = MetadataCatalog.get(datasets[0]) if datasets else None
    colors = list(getattr(meta, "stuff_colors", None) or []) if meta is not None else []
    if len(colors) != len(names):
        colors = []
    text = {"prompt_template": None, "prompts": None, "text_encoder": None, "text_embeddings": None}
    if encoder is not None:  # None: a decoder that reads no text (Mask2Former baseline)
        with torch.no_grad():
            embeddings = model.text_embeddings().detach().float().cpu()  # (K, D)
        text = {
            "prompt_template": encoder.prompt_template,
            "prompts": encoder.prompts(names),
            "text_encoder": encoder.identity(),
            "text_embeddings": embeddings.tolist(),
        }
    fields["training"]["iteration"] = iteration
    return {
        "format": CARD_FORMAT,
        "project_version": project_version(),
        "class_names": names,
        "colors": [[int(v) for v in c] for c in colors],
        **text,
        **fields,
        "metrics": dict(metrics or {}),
    }


def apply_model_card(model, card: dict | None, source: str = "checkpoint") -> bool:
    """Give the stored text embeddings of ``card`` to ``model``'s text encoder. Returns whether a
    card was applied (False for a checkpoint without one: the encoder then runs CLIP)."""
    model = _unwrap(model)
    encoder = getattr(model, "text_encoder", None)
    if encoder is None:
        return False
    if not card:
        logger.info(
            "%s has no model card: the class text embeddings come from the CLIP text encoder (%s)",
            source,
            encoder.pretrained or "random init",
        )
        return False
    names = list(card.get("class_names") or [])
    if len(names) != model.num_train_classes:
        raise ValueError(
            f"{source}: its model card lists {len(names)} classes but the model built from this "
            f"config has {model.num_train_classes}; use the config it was trained with"
        )
    encoder.set_stored_embeddings(
        card["prompts"], card["text_embeddings"], card.get("text_encoder")
    )
    if list(model.class_names) != names:
        logger.warning(
            "%s: trained on classes %s, the config's dataset names %s; the checkpoint's classes "
            "are used",
            source,
            names,
            list(model.class_names),
        )
        model.class_names = names
    return True


def check_card(card, where: str) -> dict:
    """``card`` (read from a checkpoint or ONNX metadata) is a mapping whose ``config``, when
    present, is plain YAML (parsed with the safe loader: no Python tags). Returns it; else a
    :class:`~segclip_d2.errors.UserError` naming ``where``."""
    from segclip_d2.config.load import parse_yaml_text
    from segclip_d2.errors import UserError

    if not isinstance(card, dict):
        raise UserError(where, f"its model card is a {type(card).__name__}, not a mapping")
    config = card.get("config")
    if config is not None:
        if not isinstance(config, str):
            raise UserError(where, "its model card's config is not YAML text")
        parse_yaml_text(config, f"{where}: model card config")
    return card


def read_model_card(path: str) -> tuple[dict | None, dict]:
    """(card or None, the rest of the checkpoint's top-level entries except the weights); the
    file is read by :func:`~segclip_d2.checkpoint.files.read_checkpoint` (no code runs)."""
    from segclip_d2.errors import UserError

    from .files import read_checkpoint

    ckpt = read_checkpoint(path)
    if "model" not in ckpt:
        raise UserError(path, "is not a segclip-d2 / detectron2 checkpoint (no 'model' entry)")
    rest = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "scheduler")}
    card = ckpt.get(CARD_KEY)
    return (None if card is None else check_card(card, path)), rest


def read_onnx_card(path: str) -> dict:
    """The model card stored in an exported ONNX file's metadata (JSON, checked as
    :func:`check_card`); a :class:`~segclip_d2.errors.UserError` naming the file otherwise."""
    import onnx

    from segclip_d2.errors import UserError

    if not os.path.isfile(path):
        raise UserError(path, "no such ONNX file")
    try:
        props = onnx.load(path, load_external_data=False).metadata_props
    except Exception as e:  # noqa: BLE001 - any unreadable file
        raise UserError(path, f"cannot be read as ONNX ({type(e).__name__}: {e})") from None
    meta = {p.key: p.value for p in props}
    if "segclip_model_card" not in meta:
        raise UserError(
            path, "has no segclip_model_card metadata", "export it with tools/export_onnx.py"
        )
    try:
        card = json.loads(meta["segclip_model_card"])
    except json.JSONDecodeError as e:
        raise UserError(path, f"its segclip_model_card metadata is not JSON ({e})") from None
    return check_card(card, path)


def card_bands(card: dict) -> list[str]:
    """The model's input band names; a card from before band names were recorded: RGB."""
    return list((card.get("input") or {}).get("bands") or RGB_NAMES)


def card_values(card: dict) -> str:
    """The card's ``input.values``; derived from its bands and statistics when not recorded."""
    inp = card.get("input") or {}
    return inp.get("values") or input_values(card_bands(card), inp.get("pixel_mean") or ())


def format_model_card(card: dict, path: str = "") -> str:
    """The card as a human-readable text (what ``tools/model_card.py`` prints)."""
    lines = [f"Model card of {path}" if path else "Model card"]
    lines.append(f"  project version: {card.get('project_version')}")
    training = card.get("training") or {}
    gsd = training.get("gsd_m")
    lines.append(f"  training data:   {', '.join(training.get('datasets') or []) or 'unknown'}")
    lines.append(f"  iteration:       {training.get('iteration')}")
    crop = training.get("crop_size")
    lines.append(f"  input size:      {'x'.join(map(str, crop)) if crop else 'whole images'} crops")
    lines.append(f"  GSD:             {f'{gsd} m/px ({gsd * 100:g} cm/px)' if gsd else 'unknown'}")
    inp = card.get("input") or {}
    lines.append(
        f"  input bands:     {','.join(card_bands(card))} ({card_values(card)}), mean "
        f"{inp.get('pixel_mean')}, std {inp.get('pixel_std')}"
    )
    enc = card.get("text_encoder") or {}
    sha = enc.get("weights_sha256")
    weights = "random init" if enc.get("random_init") else f"{enc.get('weights_file')} ({sha})"
    lines.append(
        f"  text encoder:    open_clip {enc.get('open_clip_model')} pretrained "
        f"{enc.get('pretrained')!r}: {weights}"
    )
    emb = card.get("text_embeddings") or []
    dim = len(emb[0]) if emb else 0
    lines.append(f"  prompt template: {card.get('prompt_template')!r}")
    lines.append(f"  class embeddings: {len(emb)} x {dim} stored")
    lines.append(f"  classes ({len(card.get('class_names') or [])}):")
    colors = card.get("colors") or []
    for i, name in enumerate(card.get("class_names") or []):
        color = colors[i] if i < len(colors) else None
        hex_color = "#" + "".join(f"{int(v):02x}" for v in color) if color else "-"
        prompt = (card.get("prompts") or [""] * (i + 1))[i]
        lines.append(f"    {i:3d}  {name:<22s} {hex_color}  {prompt!r}")
    metrics = card.get("metrics") or {}
    if metrics:
        lines.append("  metrics at save time:")
        for k, v in metrics.items():
            lines.append(f"    {k}: {v:.4f}" if isinstance(v, float) else f"    {k}: {v}")
    else:
        lines.append("  metrics at save time: not known (saved before any evaluation)")
    return "\n".join(lines)


def card_to_json(card: dict) -> str:
    """The card as compact JSON (the ONNX export's ``segclip_model_card``), without the config
    YAML's trailing whitespace issues: everything in a card is a JSON type."""
    return json.dumps(card, separators=(",", ":"))
