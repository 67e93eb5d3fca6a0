"""Registration of every dataset split in detectron2's catalogs.

All splits use the same prepared on-disk layout, written by ``datasets/prepare_*.py`` (or, for the
synthetic set, generated on first use)::

    $DETECTRON2_DATASETS/<dataset dir>/<split>/images/<stem>.png   RGB image
    $DETECTRON2_DATASETS/<dataset dir>/<split>/labels/<stem>.png   train ids, uint8, 255 = ignore

The root is read when a split is loaded, not at import, so ``DETECTRON2_DATASETS`` can be set at
any time before ``DatasetCatalog.get``. Metadata (``stuff_classes``, ``stuff_colors``,
``ignore_label``, ``evaluator_type``) comes from :mod:`segclip_d2.data.dataset_facts`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog

from .dataset_facts import DatasetFacts, get_facts

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def datasets_root() -> Path:
    """The root of prepared datasets: ``$DETECTRON2_DATASETS``, default ``./datasets``."""
    return Path(os.environ.get("DETECTRON2_DATASETS", "datasets")).expanduser()


class DatasetNotPreparedError(FileNotFoundError):
    """A registered split's folder is missing or empty."""


def load_semseg_split(
    image_dir: Path, label_dir: Path | None, facts: DatasetFacts, split_name: str
) -> list[dict]:
    """Pair images with label PNGs of the same stem. ``label_dir=None`` for unlabelled splits."""
    if not image_dir.is_dir():
        raise DatasetNotPreparedError(
            f"dataset split '{split_name}': image folder {image_dir} does not exist. Prepare it "
            f"with: {facts.prepare_command} (or set DETECTRON2_DATASETS to the folder that holds "
            f"'{image_dir.parent.parent.name}/')"
        )
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not images:
        raise DatasetNotPreparedError(
            f"dataset split '{split_name}': no images in {image_dir}. Prepare it with: "
            f"{facts.prepare_command}"
        )
    records = []
    missing = []
    for idx, img in enumerate(images):
        rec = {"file_name": str(img), "image_id": img.stem}
        if label_dir is not None:
            lbl = label_dir / (img.stem + ".png")
            if not lbl.is_file():
                missing.append(str(lbl))
                continue
            rec["sem_seg_file_name"] = str(lbl)
        records.append(rec)
        del idx
    if missing:
        raise DatasetNotPreparedError(
            f"dataset split '{split_name}': {len(missing)} images have no label, e.g. "
            f"{missing[0]}. Re-run: {facts.prepare_command}"
        )
    return records


def register_semseg_split(
    name: str,
    facts_key: str,
    relative_dir: str,
    labelled: bool = True,
    before_load: Callable[[Path], None] | None = None,
    **extra_metadata,
) -> None:
    """Register ``name`` reading ``$DETECTRON2_DATASETS/<relative_dir>/{images,labels}``.

    ``before_load(root)`` runs before listing the files (the synthetic set generates itself
    there). ``extra_metadata`` is added to the split's metadata (for example ``domain``).
    """
    facts = get_facts(facts_key)

    def _load():
        root = datasets_root()
        if before_load is not None:
            before_load(root)
        split_dir = root / relative_dir
        label_dir = split_dir / "labels" if labelled else None
        return load_semseg_split(split_dir / "images", label_dir, facts, name)

    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, _load)
    MetadataCatalog.get(name).set(
        stuff_classes=list(facts.classes),
        stuff_colors=[list(c) for c in facts.colors],
        ignore_label=facts.ignore_label,
        evaluator_type=facts.evaluator_type,
        dataset_key=facts.key,
        split_dir=relative_dir,
        **extra_metadata,
    )


def _ensure_synthetic(root: Path) -> None:
    from .synthetic import ensure_synthetic_aerial

    ensure_synthetic_aerial(root)


def register_synthetic() -> None:
    for split in ("train", "val"):
        register_semseg_split(
            f"synthetic_aerial_{split}",
            "synthetic_aerial",
            f"synthetic_aerial/{split}",
            before_load=_ensure_synthetic,
        )


def register_all() -> None:
    register_synthetic()


register_all()
