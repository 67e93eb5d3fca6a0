"""Benchmark submission writers, used when ``TEST.FORMAT_ONLY`` is set.

A split names its writer in its metadata (``formatter="loveda"``, set at registration); the
evaluator calls ``write(input_dict, pred)`` per image on every process and ``finalize()`` once on
the main process after all processes are done.

* ``loveda`` - the LoveDA CodaLab test server: one single-channel PNG per test tile, pixel values
  0..6 (background, building, road, water, barren, forest, agriculture), named like the original
  tile (``4191.png``), all zipped flat (no folder) into ``Result.zip``.
* ``uavid`` - the UAVid benchmark: colour label PNGs in the official palette, laid out like the
  release ``<seq>/Labels/<frame>.png``, zipped into ``UAVid_submission.zip``.

Original names come from the split's ``manifest.json`` (stem -> source path in the release),
written by the preparation scripts.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
from detectron2.data import MetadataCatalog
from PIL import Image

from ..utils.atomic import atomic_output
from .dataset_facts import get_facts
from .register import MANIFEST_NAME


def _atomic_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG")


class SubmissionFormatter:
    """Base: maps an input dict to its source path via the split's manifest."""

    folder_name = "submission"
    archive_name = "submission.zip"

    def __init__(self, dataset_name: str, output_dir: str):
        meta = MetadataCatalog.get(dataset_name)
        self.dataset_name = dataset_name
        self.facts = get_facts(meta.dataset_key)
        self.out_dir = Path(output_dir) / self.folder_name
        self._manifests: dict[Path, dict] = {}

    def source_of(self, input_dict: dict) -> PurePosixPath:
        """The release-relative source path of the image of ``input_dict``."""
        image = Path(input_dict["file_name"])
        split_dir = image.parent.parent
        if split_dir not in self._manifests:
            manifest = split_dir / MANIFEST_NAME
            if not manifest.is_file():
                raise FileNotFoundError(
                    f"{manifest} not found: the submission writer needs the manifest written by "
                    f"{self.facts.prepare_command}"
                )
            self._manifests[split_dir] = json.loads(manifest.read_text())["items"]
        items = self._manifests[split_dir]
        if image.stem not in items:
            raise KeyError(f"{image}: not listed in {split_dir / MANIFEST_NAME}")
        return PurePosixPath(items[image.stem].replace(os.sep, "/"))

    def target_of(self, source: PurePosixPath) -> PurePosixPath:
        raise NotImplementedError

    def encode(self, pred: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def write(self, input_dict: dict, pred: np.ndarray) -> Path:
        """Write one prediction ``pred`` (H, W) train ids; returns the written path."""
        h, w = input_dict.get("height", pred.shape[0]), input_dict.get("width", pred.shape[1])
        if pred.shape != (h, w):
            raise ValueError(
                f"{input_dict['file_name']}: prediction {pred.shape} is not the original size "
                f"{(h, w)}"
            )
        path = self.out_dir / self.target_of(self.source_of(input_dict))
        _atomic_png(path, self.encode(pred))
        return path

    def finalize(self) -> list[Path]:
        """Zip the written files (main process, after every process wrote its part)."""
        files = sorted(p for p in self.out_dir.rglob("*.png") if not p.name.startswith("."))
        if not files:
            raise RuntimeError(f"{self.out_dir}: no predictions were written")
        archive = self.out_dir.parent / self.archive_name
        with atomic_output(archive) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for f in files:
                zf.write(f, f.relative_to(self.out_dir).as_posix())
        return [self.out_dir, archive]


class LoveDAFormatter(SubmissionFormatter):
    """Single-channel PNGs 0..6 named like the original test tiles, zipped flat as Result.zip."""

    folder_name = "loveda_submission"
    archive_name = "Result.zip"

    def __init__(self, dataset_name: str, output_dir: str):
        super().__init__(dataset_name, output_dir)
        self._names: dict[str, str] = {}

    def target_of(self, source: PurePosixPath) -> PurePosixPath:
        name = source.stem + ".png"
        other = self._names.setdefault(name, str(source))
        if other != str(source):
            raise ValueError(
                f"LoveDA submission name clash: {source} and {other} are both {name}; the test "
                "server needs one file per original tile name"
            )
        return PurePosixPath(name)

    def encode(self, pred: np.ndarray) -> np.ndarray:
        if pred.size and pred.max() >= self.facts.num_classes:
            raise ValueError(f"prediction values must be 0..{self.facts.num_classes - 1}")
        return pred.astype(np.uint8)


class UAVidFormatter(SubmissionFormatter):
    """Colour label PNGs at ``<seq>/Labels/<frame>.png`` (official layout and palette)."""

    folder_name = "uavid_submission"
    archive_name = "UAVid_submission.zip"

    def target_of(self, source: PurePosixPath) -> PurePosixPath:
        # source: uavid_<split>/<seq>/Images/<frame>.png
        if len(source.parts) < 3 or source.parts[-2] != "Images":
            raise ValueError(f"{source}: not a UAVid frame path <seq>/Images/<frame>.png")
        return PurePosixPath(source.parts[-3], "Labels", source.name)

    def encode(self, pred: np.ndarray) -> np.ndarray:
        return self.facts.colorize(pred)  # (H, W, 3) uint8


FORMATTERS = {"loveda": LoveDAFormatter, "uavid": UAVidFormatter}


def build_formatter(name: str, dataset_name: str, output_dir: str) -> SubmissionFormatter:
    if name not in FORMATTERS:
        raise KeyError(f"unknown submission formatter {name!r}; known: {sorted(FORMATTERS)}")
    return FORMATTERS[name](dataset_name, output_dir)
