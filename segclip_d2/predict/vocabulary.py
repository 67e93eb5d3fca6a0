"""The vocabulary a PyTorch model predicts: its dataset's class names and colours, or a custom
list (``--classes``) checked before the model is built: a text class head, no more classes than
queries, and a warning for every prompt CLIP's 77-token context cuts short."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ..errors import UserError, check_datasets

logger = logging.getLogger(__name__)


def dataset_vocabulary(cfg) -> tuple[list[str], list[tuple[int, int, int]]]:
    """Class names and colours of the config's dataset (metadata from dataset_facts)."""
    from detectron2.data import MetadataCatalog

    names = list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN)
    if not names:
        raise UserError(
            "DATASETS.TEST",
            "the config names no dataset, so the class names are unknown",
            "set DATASETS.TEST to the dataset the model was trained on",
        )
    key = "DATASETS.TEST" if cfg.DATASETS.TEST else "DATASETS.TRAIN"
    check_datasets(names[:1], key)
    meta = MetadataCatalog.get(names[0])
    classes = meta.get("stuff_classes", None)
    colors = meta.get("stuff_colors", None)
    if not classes or not colors:
        raise UserError(key, f"dataset {names[0]!r} has no classes/colours", None)
    return list(classes), [tuple(int(v) for v in c) for c in colors]


def check_custom_classes(cfg, custom: Sequence[str], n_dataset: int, where="--classes") -> None:
    """A custom vocabulary the model can predict: text class head, at most one class per query
    (duplicates are refused when the list is parsed, :func:`segclip_d2.cli.class_list`)."""
    head = cfg.MODEL.SEGCLIP.CLASS_HEAD
    if head != "text":
        raise UserError(
            where,
            f"needs a model with the text-similarity class head (MODEL.SEGCLIP.CLASS_HEAD text); "
            f"this config uses {head!r}, whose classifier is fixed to the {n_dataset} training "
            "classes",
            "drop --classes or use a text-head model",
        )
    queries = int(cfg.MODEL.SEGCLIP.NUM_QUERIES)
    if len(custom) > queries:
        raise UserError(
            where,
            f"{len(custom)} classes but the model has {queries} queries (MODEL.SEGCLIP."
            "NUM_QUERIES): it cannot predict more classes than queries",
            f"give at most {queries} classes",
        )
    warn_cut_prompts(cfg, custom)


def warn_cut_prompts(cfg, names: Sequence[str]) -> list[str]:
    """Warn for every class whose prompt is longer than CLIP's text context (77 tokens with the
    start and end tokens), which the text encoder cuts short; returns those names."""
    from ..data.dataset_facts import prompt_name

    try:
        import open_clip

        tokenizer = open_clip.get_tokenizer(cfg.MODEL.SEGCLIP.TEXT.MODEL_NAME)
        encode = getattr(tokenizer, "encode", None)
    except Exception as e:  # noqa: BLE001 - no tokenizer: the text encoder will say why
        logger.debug("no tokenizer to check prompt lengths: %s", e)
        return []
    if encode is None:
        return []
    template = cfg.MODEL.SEGCLIP.TEXT.PROMPT_TEMPLATE
    context = int(getattr(tokenizer, "context_length", 77) or 77)
    cut = []
    for n in names:
        tokens = len(encode(template.replace("{}", prompt_name(str(n))))) + 2
        if tokens > context:
            cut.append(n)
            logger.warning(
                "class %r: its prompt has %d tokens and is cut to CLIP's %d (the end of the name "
                "is not seen); use a shorter name",
                n,
                tokens,
                context,
            )
    return cut
