"""Registration of every dataset split in detectron2's catalogs.

All splits use the same prepared on-disk layout, written by ``datasets/prepare_*.py`` (or, for the
synthetic set, generated on first use)::

    $DETECTRON2_DATASETS/<dataset dir>/<split>/images/<stem>.png   RGB image
    $DETECTRON2_DATASETS/<dataset dir>/<split>/labels/<stem>.png   train ids, uint8, 255 = ignore

Benchmark splits (LoveDA, iSAID, UAVid) also need ``<split>/manifest.json``, which the preparation
scripts write last: a split whose preparation was interrupted is refused with a message saying so.

The root is read when a split is loaded, not at import, so ``DETECTRON2_DATASETS`` can be set at
any time before ``DatasetCatalog.get``. Metadata (``stuff_classes``, ``stuff_colors``,
``ignore_label``, ``evaluator_type``) comes from :mod:`segclip_d2.data.dataset_facts`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog

from .dataset_facts import DatasetFacts, get_facts

MANIFEST_NAME = "manifest.json"  # written last by datasets/prepare_*.py

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def datasets_root() -> Path:
    """The root of prepared datasets: ``$DETECTRON2_DATASETS``, default ``./datasets``."""
    return Path(os.environ.get("DETECTRON2_DATASETS", "datasets")).expanduser()


class DatasetNotPreparedError(FileNotFoundError):
    """A registered split's folder is missing or empty."""


def load_semseg_split(
    image_dir: Path,
    label_dir: Path | None,
    facts: DatasetFacts,
    split_name: str,
    stem_prefix: str | None = None,
) -> list[dict]:
    """Pair images with label PNGs of the same stem. ``label_dir=None`` for unlabelled splits.

    ``stem_prefix`` keeps only images whose stem starts with it (LoveDA's domain splits).
    """
    if not image_dir.is_dir():
        raise DatasetNotPreparedError(
            f"dataset split '{split_name}': image folder {image_dir} does not exist. Prepare it "
            f"with: {facts.prepare_command} (or set DETECTRON2_DATASETS to the folder that holds "
            f"'{image_dir.parent.parent.name}/')"
        )
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if stem_prefix is not None:
        images = [p for p in images if p.stem.startswith(stem_prefix)]
    if not images:
        raise DatasetNotPreparedError(
            f"dataset split '{split_name}': no images"
            f"{f' named {stem_prefix}*' if stem_prefix else ''} in {image_dir}. Prepare it "
            f"with: {facts.prepare_command}"
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
    stem_prefix: str | None = None,
    require_manifest: bool = False,
    **extra_metadata,
) -> None:
    """Register ``name`` reading ``$DETECTRON2_DATASETS/<relative_dir>/{images,labels}``.

    ``before_load(root)`` runs before listing the files (the synthetic set generates itself
    there). ``stem_prefix`` selects a subset of the folder by file-name prefix (a domain).
    ``require_manifest`` refuses a split whose preparation did not finish (the preparation
    scripts write ``manifest.json`` last). ``extra_metadata`` is added to the split's metadata
    (for example ``domain`` or ``formatter``).
    """
    facts = get_facts(facts_key)

    def _load():
        root = datasets_root()
        if before_load is not None:
            before_load(root)
        split_dir = root / relative_dir
        if require_manifest:
            check_manifest(split_dir, facts, name)
        label_dir = split_dir / "labels" if labelled else None
        return load_semseg_split(split_dir / "images", label_dir, facts, name, stem_prefix)

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
        labelled=labelled,
        **extra_metadata,
    )


def check_manifest(split_dir: Path, facts: DatasetFacts, split_name: str) -> dict:
    """The split's ``manifest.json`` (written last by the preparation scripts), or an error
    saying the split is missing or was not completely prepared."""
    manifest = split_dir / MANIFEST_NAME
    if not split_dir.is_dir():
        raise DatasetNotPreparedError(
            f"dataset split '{split_name}': folder {split_dir} does not exist. Prepare it with: "
            f"{facts.prepare_command} (or set DETECTRON2_DATASETS to the folder that holds "
            f"'{split_dir.parent.name}/')"
        )
    if not manifest.is_file():
        raise DatasetNotPreparedError(
            f"dataset split '{split_name}': {split_dir} has no {MANIFEST_NAME}, so its "
            f"preparation did not finish (interrupted or failed). Re-run: {facts.prepare_command}"
            " (finished images are skipped)"
        )
    try:
        data = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetNotPreparedError(f"{manifest}: unreadable manifest ({e})") from e
    if not data.get("complete"):
        raise DatasetNotPreparedError(f"{manifest}: split not marked complete")
    return data


def _ensure_synthetic(root: Path) -> None:
    from .synthetic import ensure_synthetic_aerial

    ensure_synthetic_aerial(root)


def _ensure_synthetic_nir(root: Path) -> None:
    from .synthetic import ensure_synthetic_aerial

    ensure_synthetic_aerial(root, nir=True)


def register_synthetic() -> None:
    """``synthetic_aerial_{train,val}`` (RGB PNGs) and ``synthetic_aerial_nir_{train,val}`` (the
    same tiles with a near-infrared band, 4-band TIFFs)."""
    from .synthetic import NIR_BANDS, RGB_BANDS

    for split in ("train", "val"):
        register_semseg_split(
            f"synthetic_aerial_{split}",
            "synthetic_aerial",
            f"synthetic_aerial/{split}",
            before_load=_ensure_synthetic,
            bands=list(RGB_BANDS),
        )
        register_semseg_split(
            f"synthetic_aerial_nir_{split}",
            "synthetic_aerial",
            f"synthetic_aerial_nir/{split}",
            before_load=_ensure_synthetic_nir,
            bands=list(NIR_BANDS),
        )


def register_loveda() -> None:
    """``loveda_{train,val,test}`` and per-domain ``loveda_<split>_{urban,rural}``."""
    for split, labelled in (("train", True), ("val", True), ("test", False)):
        common = dict(labelled=labelled, require_manifest=True, formatter="loveda")
        register_semseg_split(f"loveda_{split}", "loveda", f"loveda/{split}", **common)
        for domain in ("urban", "rural"):
            register_semseg_split(
                f"loveda_{split}_{domain}",
                "loveda",
                f"loveda/{split}",
                stem_prefix=f"{domain}_",
                domain=domain,
                **common,
            )


def register_isaid() -> None:
    """``isaid_{train,val}`` (896 patches) and unlabelled ``isaid_test`` (when prepared)."""
    for split, labelled in (("train", True), ("val", True), ("test", False)):
        register_semseg_split(
            f"isaid_{split}", "isaid", f"isaid/{split}", labelled=labelled, require_manifest=True
        )


def register_uavid() -> None:
    """``uavid_{train,val}`` (patches), ``uavid_val_full`` (full frames) and ``uavid_test``
    (full frames, unlabelled; the submission writer needs whole frames)."""
    register_semseg_split("uavid_train", "uavid", "uavid/train", require_manifest=True)
    register_semseg_split("uavid_val", "uavid", "uavid/val", require_manifest=True)
    register_semseg_split(
        "uavid_val_full", "uavid", "uavid/val_full", require_manifest=True, formatter="uavid"
    )
    register_semseg_split(
        "uavid_test",
        "uavid",
        "uavid/test",
        labelled=False,
        require_manifest=True,
        formatter="uavid",
    )


def register_all() -> None:
    """The built-in datasets, then every dataset prepared by ``datasets/prepare_custom.py``
    under ``$DETECTRON2_DATASETS`` (see :mod:`segclip_d2.data.custom`)."""
    from .custom import register_custom_datasets

    register_synthetic()
    register_loveda()
    register_isaid()
    register_uavid()
    register_custom_datasets()


register_all()
