"""Your own datasets: ``classes.yaml`` (what you write), ``dataset.yaml`` (what
``datasets/prepare_custom.py`` writes) and their registration.

``classes.yaml`` (safe YAML)::

    bands: [red, green, blue, nir]      # band names of the scenes, in file order
    ignore_value: 0                     # label-raster value of unlabelled pixels (optional)
    field: class                        # vector labels: the attribute holding the values
    classes:
      - name: building
        color: [230, 25, 75]
        prompt: a roof of a building    # or prompts: [..., ...]; default: the name
        value: 1                        # its value in label rasters / in the attribute

Train ids are the classes' positions in the list; unlabelled pixels are ``IGNORE_LABEL`` (255).

A prepared dataset is ``$DETECTRON2_DATASETS/NAME/{train,val}/{images,labels}/`` (GeoTIFF tiles
with all bands, train-id PNG labels) plus ``NAME/dataset.yaml``, written last: classes, colours,
prompts, band names, per-band mean/std of the training tiles, GSD and how it was split. Every
such folder is registered as ``NAME_train`` / ``NAME_val`` (:func:`register_custom_datasets`),
and ``DATASETS.CUSTOM: NAME`` fills a config from it (:func:`apply_custom_dataset`).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .bands import check_band_names
from .dataset_facts import BUILTIN_KEYS, IGNORE_LABEL, DatasetFacts, add_facts

logger = logging.getLogger(__name__)

DATASET_FILE = "dataset.yaml"
CUSTOM_SPLITS = ("train", "val")
PREPARE_COMMAND = (
    "python datasets/prepare_custom.py --images SCENES --labels LABELS --classes classes.yaml "
    "--name {name} --dst $DETECTRON2_DATASETS"
)


@dataclass(frozen=True)
class ClassSpec:
    """One class of ``classes.yaml``: its train id is its position in the list."""

    name: str
    color: tuple[int, int, int]
    prompts: tuple[str, ...]
    value: int | str


@dataclass(frozen=True)
class ClassesFile:
    """A parsed ``classes.yaml``."""

    path: str
    classes: tuple[ClassSpec, ...]
    bands: tuple[str, ...]
    ignore_value: int | None = None
    field: str | None = None

    def value_to_train(self) -> dict:
        """Label value (raster value or attribute value) -> train id."""
        return {c.value: i for i, c in enumerate(self.classes)}


def safe_yaml(path: str | Path) -> dict:
    """A YAML mapping read with ``yaml.safe_load`` (no Python tags), or a :class:`UserError`."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise UserError(str(path), f"cannot be read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise UserError(str(path), f"not valid YAML{at}", "fix the syntax") from None
    if not isinstance(data, dict):
        raise UserError(str(path), "must be a YAML mapping", "see segclip_d2/data/custom.py")
    return data


def _color(value, where: str) -> tuple[int, int, int]:
    ok = isinstance(value, list | tuple) and len(value) == 3
    if not ok or not all(isinstance(v, int) and 0 <= v <= 255 for v in value):
        raise UserError(where, f"color must be three integers 0..255, got {value!r}")
    return tuple(value)


def _prompts(entry: dict, name: str, where: str) -> tuple[str, ...]:
    prompts = entry.get("prompts", entry.get("prompt", name))
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise UserError(where, f"prompt(s) must be non-empty text, got {prompts!r}")
    return tuple(p.strip() for p in prompts)


def _class_spec(entry, i: int, path: str) -> ClassSpec:
    where = f"{path}: classes[{i}]"
    if not isinstance(entry, dict):
        raise UserError(where, "must be a mapping with name, color, prompt(s) and value")
    unknown = set(entry) - {"name", "color", "prompt", "prompts", "value"}
    if unknown:
        raise UserError(
            where, f"unknown keys {sorted(unknown)}", "use name, color, prompt(s), value"
        )
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise UserError(where, "needs a name")
    value = entry.get("value")
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise UserError(where, f"value must be an integer or a text, got {value!r}")
    return ClassSpec(
        name.strip(), _color(entry.get("color"), where), _prompts(entry, name, where), value
    )


def read_classes_file(path: str | Path) -> ClassesFile:
    """Parse and check ``classes.yaml`` (see the module docstring); :class:`UserError` naming the
    file and the entry on any problem."""
    path = str(path)
    data = safe_yaml(path)
    unknown = set(data) - {"classes", "bands", "ignore_value", "field"}
    if unknown:
        raise UserError(
            path, f"unknown keys {sorted(unknown)}", "use classes, bands, ignore_value, field"
        )
    entries = data.get("classes")
    if not isinstance(entries, list) or not entries:
        raise UserError(path, "needs a non-empty list 'classes'")
    if len(entries) >= IGNORE_LABEL:
        raise UserError(path, f"{len(entries)} classes; at most {IGNORE_LABEL - 1} are supported")
    classes = tuple(_class_spec(e, i, path) for i, e in enumerate(entries))
    for attr in ("name", "value"):
        seen = [getattr(c, attr) for c in classes]
        dup = sorted({str(v) for v in seen if seen.count(v) > 1})
        if dup:
            raise UserError(path, f"classes share a {attr}: {', '.join(dup)}", "make them unique")
    try:
        bands = check_band_names(data.get("bands") or [], "bands")
    except ValueError as e:
        raise UserError(
            path, str(e), "list the scenes' band names, e.g. [red, green, blue, nir]"
        ) from None
    ignore = data.get("ignore_value")
    if ignore is not None and (isinstance(ignore, bool) or not isinstance(ignore, int | str)):
        raise UserError(path, f"ignore_value must be an integer or a text, got {ignore!r}")
    if ignore is not None and ignore in {c.value for c in classes}:
        raise UserError(path, f"ignore_value {ignore!r} is also a class value")
    field = data.get("field")
    if field is not None and not isinstance(field, str):
        raise UserError(path, f"field must be an attribute name, got {field!r}")
    return ClassesFile(path, classes, tuple(bands), ignore, field)


# --------------------------------------------------------------------------- dataset.yaml
@dataclass(frozen=True)
class CustomDataset:
    """A prepared dataset's ``dataset.yaml``."""

    name: str
    path: str
    classes: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    prompts: tuple[tuple[str, ...], ...]
    bands: tuple[str, ...]
    pixel_mean: tuple[float, ...]
    pixel_std: tuple[float, ...]
    gsd_m: float | None
    split: dict

    def facts(self) -> DatasetFacts:
        """Its facts, in the form of the built-in datasets' (labels are train ids already)."""
        return DatasetFacts(
            key=self.name,
            title=self.name,
            classes=self.classes,
            colors=self.colors,
            raw_encoding="index",
            raw_to_train={i: i for i in range(len(self.classes))} | {IGNORE_LABEL: IGNORE_LABEL},
            prepare_command=PREPARE_COMMAND.format(name=self.name),
        )


def _numbers(data: dict, key: str, n: int, path: str) -> tuple[float, ...]:
    values = data.get(key)
    ok = isinstance(values, list) and len(values) == n
    if not ok or not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
        raise UserError(path, f"{key} must be {n} finite numbers (one per band), got {values!r}")
    return tuple(float(v) for v in values)


def read_dataset_file(path: str | Path) -> CustomDataset:
    """Parse a prepared dataset's ``dataset.yaml`` (:class:`UserError` when it is broken)."""
    path = str(path)
    data = safe_yaml(path)
    entries = data.get("classes")
    if (
        not isinstance(entries, list)
        or not entries
        or not all(isinstance(e, dict) for e in entries)
    ):
        raise UserError(path, "needs a list 'classes' of mappings", "prepare the dataset again")
    names = tuple(str(e.get("name", "")) for e in entries)
    colors = tuple(_color(e.get("color"), f"{path}: class {n}") for n, e in zip(names, entries))
    prompts = tuple(_prompts(e, n, f"{path}: class {n}") for n, e in zip(names, entries))
    try:
        bands = tuple(check_band_names(data.get("bands") or [], "bands"))
    except ValueError as e:
        raise UserError(path, str(e), "prepare the dataset again") from None
    gsd = data.get("gsd_m")
    return CustomDataset(
        name=str(data.get("name") or Path(path).parent.name),
        path=path,
        classes=names,
        colors=colors,
        prompts=prompts,
        bands=bands,
        pixel_mean=_numbers(data, "pixel_mean", len(bands), path),
        pixel_std=_numbers(data, "pixel_std", len(bands), path),
        gsd_m=float(gsd) if isinstance(gsd, int | float) and gsd > 0 else None,
        split=dict(data.get("split") or {}),
    )


# --------------------------------------------------------------------------- registration
_REGISTERED: dict[str, CustomDataset] = {}


def _datasets_root() -> Path:
    return Path(os.environ.get("DETECTRON2_DATASETS", "datasets")).expanduser()


def register_custom_dataset(ds: CustomDataset) -> None:
    """Register ``NAME_train`` / ``NAME_val`` of a prepared dataset (its folder is found under
    ``$DETECTRON2_DATASETS`` when a split is loaded)."""
    from .register import register_semseg_split

    add_facts(ds.facts())
    for split in CUSTOM_SPLITS:
        register_semseg_split(
            f"{ds.name}_{split}",
            ds.name,
            f"{ds.name}/{split}",
            prompts=[list(p) for p in ds.prompts],
            bands=list(ds.bands),
            pixel_mean=list(ds.pixel_mean),
            pixel_std=list(ds.pixel_std),
            gsd_m=ds.gsd_m,
            dataset_file=ds.path,
        )
    _REGISTERED[ds.name] = ds


def register_custom_datasets(root: str | Path | None = None) -> list[str]:
    """Register every ``<root>/NAME/dataset.yaml`` (default root ``$DETECTRON2_DATASETS``);
    return the names. A broken one is skipped with a warning; built-in names are not taken."""
    root = Path(root) if root is not None else _datasets_root()
    names = []
    if not root.is_dir():
        return names
    for path in sorted(root.glob(f"*/{DATASET_FILE}")):
        name = path.parent.name
        if name in BUILTIN_KEYS:
            logger.warning("%s: %r is a built-in dataset name; not registered", path, name)
            continue
        try:
            ds = read_dataset_file(path)
        except UserError as e:
            logger.warning("custom dataset not registered: %s", e.line())
            continue
        if ds.name != name:
            logger.warning("%s: name %r differs from its folder; using %r", path, ds.name, name)
            ds = CustomDataset(**{**ds.__dict__, "name": name})
        register_custom_dataset(ds)
        names.append(name)
    return names


def apply_custom_dataset(cfg) -> None:
    """With ``DATASETS.CUSTOM: NAME``: register the datasets under ``$DETECTRON2_DATASETS`` and
    set ``DATASETS.TRAIN/TEST`` to ``NAME_train``/``NAME_val``, ``INPUT.BANDS``,
    ``MODEL.PIXEL_MEAN/STD`` and ``INPUT.GSD_M`` from ``NAME/dataset.yaml``. Classes, colours and
    prompts reach the model through the registered metadata."""
    name = str(cfg.DATASETS.CUSTOM or "").strip()
    if not name:
        return
    root = _datasets_root()
    path = root / name / DATASET_FILE
    if not path.is_file():
        raise UserError(
            "DATASETS.CUSTOM",
            f"no prepared dataset {name!r}: {path} does not exist",
            f"run {PREPARE_COMMAND.format(name=name)} (or set DETECTRON2_DATASETS)",
        )
    register_custom_datasets(root)
    ds = read_dataset_file(path)  # errors of this one are the user's to fix
    cfg.DATASETS.TRAIN = (f"{name}_train",)
    cfg.DATASETS.TEST = (f"{name}_val",)
    cfg.INPUT.BANDS = list(ds.bands)
    cfg.MODEL.PIXEL_MEAN = list(ds.pixel_mean)
    cfg.MODEL.PIXEL_STD = list(ds.pixel_std)
    cfg.INPUT.GSD_M = float(ds.gsd_m or 0.0)
