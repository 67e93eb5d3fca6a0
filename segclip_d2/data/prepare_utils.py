"""Code shared by the preparation scripts ``datasets/prepare_{loveda,isaid,uavid}.py``.

A preparation script turns an official release, as extracted, into the layout registration reads::

    <dst>/<dataset>/<split>/images/<stem>.png    RGB image
    <dst>/<dataset>/<split>/labels/<stem>.png    train ids, uint8, 255 = ignore
    <dst>/<dataset>/<split>/manifest.json        written LAST: the split is complete

Guarantees kept here:

* every output file is written atomically (a temporary file in the same folder tagged with the
  writer's host and pid, fsynced, then renamed: :func:`segclip_d2.utils.atomic.atomic_output`),
  so a crash never leaves a half-written PNG under its final name; a rerun removes the temps of
  killed runs (never those of a preparation still running); files get mode 0666 minus the umask
  (0644 under umask 022), so a prepared dataset can be shared;
* each source image gets a done marker (``<split>/.progress/<source id>.json``) after all its
  outputs are written, so a rerun skips finished sources;
* the split's ``manifest.json`` is deleted when work on the split starts and written only after
  every source is done, so an interrupted run never looks complete (registration refuses a
  split without it);
* bad input (an image without its mask, mismatched sizes, label values outside the encoding, an
  unreadable/truncated PNG, an empty split) raises :class:`PrepareError` naming the file, or with
  ``--skip-bad`` is skipped with a warning and counted in the summary. A :class:`PrepareError`
  is a :class:`segclip_d2.errors.UserError`: one line ``error: ...`` and exit code 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tabulate import tabulate
from tqdm import tqdm

from ..errors import ArgumentParser, UserError, check_writable_dir, run_main
from ..utils.atomic import atomic_output, remove_stale_temps
from .dataset_facts import IGNORE_LABEL, DatasetFacts
from .register import MANIFEST_NAME

logger = logging.getLogger(__name__)

PROGRESS_DIR = ".progress"
MANIFEST_VERSION = 1


class PrepareError(UserError, RuntimeError):
    """Bad input or an inconsistent output folder; the message (``"<file>: <problem>"``) names
    the file and the problem."""

    def __init__(self, message: str, fix: str | None = None):
        where, sep, what = str(message).partition(": ")
        super().__init__(where if sep else "", what if sep else message, fix)


# --------------------------------------------------------------------------- reading
def _open_loaded(path: Path) -> Image.Image:
    if not path.is_file():
        raise PrepareError(f"{path}: file not found")
    try:
        img = Image.open(path)
        img.load()  # decodes everything: a truncated PNG fails here, not later
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise PrepareError(f"{path}: cannot decode image ({e}); is it truncated or corrupt?") from e
    return img


def read_rgb(path: Path) -> np.ndarray:
    """Read an image as ``(H, W, 3)`` uint8 RGB; :class:`PrepareError` if unreadable."""
    img = _open_loaded(path)
    if img.mode != "RGB":
        if img.mode in ("I;16", "I", "F"):
            raise PrepareError(f"{path}: expected an 8-bit RGB image, got PIL mode {img.mode}")
        img = img.convert("RGB")
    return np.asarray(img)


def read_raw_label(path: Path, facts: DatasetFacts) -> np.ndarray:
    """Read a raw (official) label: ``(H, W)`` for index encodings, ``(H, W, 3)`` for colours."""
    img = _open_loaded(path)
    if facts.raw_encoding == "index":
        if img.mode not in ("L", "P"):
            raise PrepareError(
                f"{path}: {facts.title} masks are single-channel 8-bit PNGs, "
                f"got PIL mode {img.mode}"
            )
        return np.asarray(img)  # palette PNGs keep their indices
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img)


def convert_label(raw: np.ndarray, facts: DatasetFacts, source: Path) -> np.ndarray:
    """Raw label -> train ids ``(H, W)`` uint8; :class:`PrepareError` naming ``source``."""
    try:
        return facts.raw_to_train_ids(raw, str(source))
    except ValueError as e:
        raise PrepareError(str(e)) from e


def check_same_size(image: np.ndarray, label: np.ndarray, image_path: Path, label_path: Path):
    if image.shape[:2] != label.shape[:2]:
        raise PrepareError(
            f"{label_path}: mask size {label.shape[1]}x{label.shape[0]} (WxH) differs from its "
            f"image {image_path} ({image.shape[1]}x{image.shape[0]})"
        )


# --------------------------------------------------------------------------- atomic writing
def atomic_write_png(path: Path, array: np.ndarray) -> None:
    """Write a uint8 ``(H, W)`` or ``(H, W, 3)`` array as PNG via a temporary file."""
    if array.dtype != np.uint8:
        raise TypeError(f"{path}: expected uint8, got {array.dtype}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG", compress_level=1)


def atomic_copy(src: Path, dst: Path) -> None:
    """Copy a file's bytes (not its mode) via a temporary file in the destination folder."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(dst) as tmp:
        shutil.copyfile(src, tmp)


def atomic_write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")


def file_digest(path: Path, algorithm: str = "md5", chunk: int = 1 << 20) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- patches
def window_starts(length: int, patch: int, stride: int) -> list[int]:
    """Start offsets of windows of size ``patch`` every ``stride`` along ``length``.

    The last window is shifted back to end exactly at ``length`` (no window sticks out), so
    every pixel is covered. ``length <= patch`` gives the single start 0 (the caller pads).
    """
    if patch <= 0 or stride <= 0:
        raise ValueError(f"patch ({patch}) and stride ({stride}) must be positive")
    if length <= patch:
        return [0]
    starts = list(range(0, length - patch, stride))
    if starts[-1] != length - patch:
        starts.append(length - patch)
    return starts


def patch_windows(height: int, width: int, patch: int, stride: int) -> list[tuple[int, int]]:
    """``(y0, x0)`` of every window, row by row."""
    return [
        (y, x)
        for y in window_starts(height, patch, stride)
        for x in window_starts(width, patch, stride)
    ]


def cut_patch(array: np.ndarray, y0: int, x0: int, patch: int, pad_value: int) -> np.ndarray:
    """The ``patch`` x ``patch`` window at ``(y0, x0)``, padded bottom/right with ``pad_value``
    where the array is smaller than the window."""
    win = array[y0 : y0 + patch, x0 : x0 + patch]
    ph, pw = patch - win.shape[0], patch - win.shape[1]
    if ph or pw:
        pad = ((0, ph), (0, pw)) + ((0, 0),) * (array.ndim - 2)
        win = np.pad(win, pad, mode="constant", constant_values=pad_value)
    return np.ascontiguousarray(win)


def iter_patches(
    image: np.ndarray, label: np.ndarray | None, stem: str, patch: int, stride: int
) -> Iterator[tuple[str, np.ndarray, np.ndarray | None]]:
    """Cut an image (and label) into named patches ``<stem>_<y0>_<x0>``; images pad with 0 and
    labels with 255 (ignore) when the image is smaller than the patch."""
    h, w = image.shape[:2]
    for y0, x0 in patch_windows(h, w, patch, stride):
        img = cut_patch(image, y0, x0, patch, 0)
        lbl = None if label is None else cut_patch(label, y0, x0, patch, IGNORE_LABEL)
        yield f"{stem}_{y0:05d}_{x0:05d}", img, lbl


# --------------------------------------------------------------------------- split writing
@dataclass
class Source:
    """One source image of the official release (and its mask, if the split is labelled)."""

    source_id: str  # unique within the split; names the done marker
    image: Path
    label: Path | None
    rel: str  # path relative to --src, stored in the manifest
    info: dict = field(default_factory=dict)


# An item to write: (stem, image array or a Path to copy as-is, label array or None)
Item = tuple[str, "np.ndarray | Path", "np.ndarray | None"]


@dataclass
class SplitSummary:
    dataset: str
    split: str
    sources: int = 0
    written_sources: int = 0
    reused_sources: int = 0
    items: int = 0
    skipped: list[dict] = field(default_factory=list)
    class_pixels: np.ndarray | None = None
    ignore_pixels: int = 0


def clear_folder(folder: Path) -> None:
    """Delete what ``folder`` holds (``--overwrite``). A symbolic link to a folder (a split kept
    on another disk) stays a link: its target's contents are deleted, never the link's
    neighbours; a link or file where a folder should be is an error."""
    folder = Path(folder)
    if folder.is_symlink() and not folder.is_dir():
        raise PrepareError(f"{folder}: a broken symbolic link where the split folder should be")
    if not folder.exists():
        return
    if not folder.is_dir():
        raise PrepareError(f"{folder}: a file where the split folder should be; move it away")
    if not folder.is_symlink():
        shutil.rmtree(folder)
        return
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


class SplitWriter:
    """Writes one output split with done markers and a manifest written last."""

    def __init__(
        self,
        out_dir: Path,
        facts: DatasetFacts,
        split: str,
        labelled: bool,
        options: dict,
        overwrite: bool = False,
    ):
        self.dir = Path(out_dir)
        self.facts = facts
        self.split = split
        self.labelled = labelled
        self.options = dict(options)
        if overwrite:
            clear_folder(self.dir)
        remove_stale_temps(self.dir, recursive=True)  # of killed runs; running ones' stay
        self.progress = self.dir / PROGRESS_DIR
        self.progress.mkdir(parents=True, exist_ok=True)
        (self.dir / "images").mkdir(exist_ok=True)
        if labelled:
            (self.dir / "labels").mkdir(exist_ok=True)
        opts_file = self.progress / "options.json"
        if opts_file.is_file():
            old = json.loads(opts_file.read_text())
            if old != self.options:
                raise PrepareError(
                    f"{self.dir} was prepared with different options {old} (now {self.options}); "
                    "pass --overwrite to rebuild it or choose another --dst"
                )
        else:
            atomic_write_json(opts_file, self.options)
        # From here on the split must not look complete until finish() succeeds.
        manifest = self.dir / MANIFEST_NAME
        if manifest.exists():
            manifest.unlink()
        self.summary = SplitSummary(facts.key, split)
        self.summary.class_pixels = np.zeros(facts.num_classes, dtype=np.int64)
        self._items: dict[str, str] = {}

    def _marker(self, source_id: str) -> Path:
        return self.progress / f"{source_id}.json"

    def _outputs(self, stem: str) -> list[Path]:
        out = [self.dir / "images" / f"{stem}.png"]
        if self.labelled:
            out.append(self.dir / "labels" / f"{stem}.png")
        return out

    def done_record(self, source: Source) -> dict | None:
        """The done marker of ``source`` if it exists and all its outputs are present."""
        marker = self._marker(source.source_id)
        if not marker.is_file():
            return None
        try:
            rec = json.loads(marker.read_text())
        except (json.JSONDecodeError, OSError):
            return None
        if all(p.is_file() for s in rec["stems"] for p in self._outputs(s)):
            return rec
        return None

    def _add(self, source: Source, stems: list[str], hist: list[int], ignore: int, reused: bool):
        s = self.summary
        for stem in stems:
            if stem in self._items:
                raise PrepareError(
                    f"{source.image}: output name {stem!r} is also produced by "
                    f"{self._items[stem]}; stems must be unique within a split"
                )
            self._items[stem] = source.rel
        s.items += len(stems)
        s.class_pixels += np.asarray(hist, dtype=np.int64)
        s.ignore_pixels += int(ignore)
        if reused:
            s.reused_sources += 1
        else:
            s.written_sources += 1

    def write_source(self, source: Source, items: Iterable[Item]) -> None:
        """Write every item of ``source`` (atomically), then its done marker."""
        stems, k = [], self.facts.num_classes
        hist = np.zeros(k, dtype=np.int64)
        ignore = 0
        for stem, image, label in items:
            img_out, *lbl_out = self._outputs(stem)
            if isinstance(image, Path):
                atomic_copy(image, img_out)
            else:
                atomic_write_png(img_out, image)
            if self.labelled:
                if label is None:
                    raise PrepareError(f"{source.image}: labelled split but no label produced")
                counts = np.bincount(label.ravel(), minlength=256)
                hist += counts[:k]
                ignore += int(counts[IGNORE_LABEL])
                atomic_write_png(lbl_out[0], label)
            stems.append(stem)
        if not stems:
            raise PrepareError(f"{source.image}: produced no output")
        self._add(source, stems, hist.tolist(), ignore, reused=False)
        atomic_write_json(
            self._marker(source.source_id),
            {"source": source.rel, "stems": stems, "hist": hist.tolist(), "ignore": ignore},
        )

    def reuse(self, source: Source, rec: dict) -> None:
        self._add(source, rec["stems"], rec["hist"], rec["ignore"], reused=True)

    def skip(self, source: Source, error: Exception) -> None:
        self.summary.skipped.append({"source": source.rel, "error": str(error)})

    def finish(self, extra: dict | None = None) -> SplitSummary:
        """Write the manifest (last); raises when nothing was written."""
        s = self.summary
        if s.items == 0:
            raise PrepareError(
                f"split {self.split!r}: no usable source image (all {s.sources} skipped); "
                "nothing written"
            )
        manifest = {
            "version": MANIFEST_VERSION,
            "dataset": self.facts.key,
            "split": self.split,
            "labelled": self.labelled,
            "options": self.options,
            "complete": True,
            "num_sources": s.sources - len(s.skipped),
            "num_items": s.items,
            "skipped": s.skipped,
            "class_pixels": dict(zip(self.facts.classes, s.class_pixels.tolist())),
            "ignore_pixels": s.ignore_pixels,
            # stem -> source path relative to the release root (formatters recover names here)
            "items": dict(sorted(self._items.items())),
            **(extra or {}),
        }
        atomic_write_json(self.dir / MANIFEST_NAME, manifest)
        return s


def run_split(
    writer: SplitWriter,
    sources: Sequence[Source],
    make_items: Callable[[Source], Iterable[Item]],
    skip_bad: bool,
    desc: str,
) -> SplitSummary:
    """Process every source of a split: reuse finished ones, write the others, then finish.

    ``make_items(source)`` must read and verify everything it needs before returning its
    iterable of items (use :func:`load_pair`, don't make it a generator), so a bad source
    writes nothing.
    """
    writer.summary.sources = len(sources)
    for source in tqdm(sources, desc=desc, unit="img", dynamic_ncols=True):
        rec = writer.done_record(source)
        if rec is not None:
            writer.reuse(source, rec)
            continue
        try:
            writer.write_source(source, make_items(source))
        except PrepareError as e:
            if not skip_bad:
                raise
            logger.warning("skipping bad input: %s", e)
            tqdm.write(f"WARNING: skipping bad input: {e}")
            writer.skip(source, e)
    return writer.finish()


def require_sources(sources: Sequence[Source], where: Path, what: str) -> None:
    if not sources:
        raise PrepareError(f"{where}: empty split, no {what} found")


def load_pair(source: Source, facts: DatasetFacts) -> tuple[np.ndarray, np.ndarray | None]:
    """Read and verify a source: ``(image (H, W, 3) uint8, train ids (H, W) uint8 or None)``.

    Checks: the mask exists, both files decode, sizes match, label values/colours belong to the
    encoding. Raises :class:`PrepareError` naming the file otherwise.
    """
    if source.label is not None and not source.label.is_file():
        raise PrepareError(f"{source.image}: its mask {source.label} is missing")
    image = read_rgb(source.image)
    if source.label is None:
        return image, None
    raw = read_raw_label(source.label, facts)
    check_same_size(image, raw, source.image, source.label)
    return image, convert_label(raw, facts, source.label)


def whole_image_item(source: Source, image: np.ndarray, label: np.ndarray | None) -> Item:
    """The item of an untouched source image: the file is copied byte for byte when it is
    already an RGB PNG (fast, lossless), otherwise the decoded array is re-encoded."""
    with Image.open(source.image) as im:
        copy_as_is = im.format == "PNG" and im.mode == "RGB"
    return (source.source_id, source.image if copy_as_is else image, label)


def patch_items(source: Source, facts: DatasetFacts, patch: int, stride: int) -> Iterator[Item]:
    """The verified source cut into ``patch``-sized windows every ``stride`` pixels."""
    image, label = load_pair(source, facts)
    return iter_patches(image, label, source.source_id, patch, stride)


def whole_image_items(source: Source, facts: DatasetFacts) -> list[Item]:
    """The verified source as one untouched item (see :func:`whole_image_item`)."""
    image, label = load_pair(source, facts)  # verifies everything first
    return [whole_image_item(source, image, label)]


# --------------------------------------------------------------------------- reporting / CLI
def format_summary(facts: DatasetFacts, summaries: Sequence[SplitSummary]) -> str:
    rows = []
    for s in summaries:
        rows.append(
            [
                s.split,
                s.sources - len(s.skipped),
                s.items,
                s.reused_sources,
                len(s.skipped),
            ]
        )
    text = tabulate(
        rows,
        headers=["split", "images", "outputs", "reused (rerun)", "skipped (bad)"],
        tablefmt="github",
    )
    hist_rows = []
    labelled = [s for s in summaries if s.class_pixels is not None and s.class_pixels.sum() > 0]
    for i, name in enumerate(facts.classes):
        row = [name]
        for s in labelled:
            tot = s.class_pixels.sum() + s.ignore_pixels
            row.append(f"{100.0 * s.class_pixels[i] / max(tot, 1):.2f}")
        hist_rows.append(row)
    if labelled:
        ign = ["(ignore)"]
        for s in labelled:
            tot = s.class_pixels.sum() + s.ignore_pixels
            ign.append(f"{100.0 * s.ignore_pixels / max(tot, 1):.2f}")
        hist_rows.append(ign)
        text += "\n\nclass pixel histogram (% of written label pixels)\n"
        text += tabulate(hist_rows, headers=["class"] + [s.split for s in labelled])
    for s in summaries:
        for sk in s.skipped:
            text += f"\nskipped in {s.split}: {sk['error']}"
    return text


def base_parser(description: str) -> argparse.ArgumentParser:
    p = ArgumentParser(description=description)
    p.add_argument("--src", type=Path, required=True, help="official release, as extracted")
    p.add_argument(
        "--dst", type=Path, required=True, help="output root; use it as DETECTRON2_DATASETS"
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip (with a warning, counted in the summary) source images that fail checks",
    )
    p.add_argument("--overwrite", action="store_true", help="delete and rebuild the output splits")
    return p


def add_splits_arg(parser: argparse.ArgumentParser, choices: Sequence[str], help: str) -> None:
    """``--splits``, by default (None) the splits the script finds (``help`` says which)."""
    parser.add_argument("--splits", nargs="+", choices=list(choices), default=None, help=help)


def add_patch_args(parser: argparse.ArgumentParser, patch_size: int, stride: int) -> None:
    """``--patch-size`` and ``--stride`` with these defaults; see :func:`check_patch_args`."""
    parser.add_argument("--patch-size", type=int, default=patch_size, help="square patch side (px)")
    parser.add_argument("--stride", type=int, default=stride, help="window step (px)")


def check_patch_args(args: argparse.Namespace) -> None:
    if args.patch_size <= 0 or args.stride <= 0:
        raise PrepareError("--patch-size and --stride must be positive")


def print_done(
    facts: DatasetFacts, summaries: Sequence[SplitSummary], t0: float, dst: Path
) -> None:
    """The summary table and the closing line of a preparation run started at ``t0``."""
    print(format_summary(facts, summaries))
    print(f"done in {time.perf_counter() - t0:.1f} s; use DETECTRON2_DATASETS={dst}")


def check_dst(dst: Path) -> None:
    """``--dst`` is a folder that can be written (or created); checked before any work."""
    check_writable_dir(dst, "--dst")


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run ``main`` under the error contract (:func:`segclip_d2.errors.run_main`): a
    :class:`PrepareError` or other user error is one line ``error: ...`` and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_main(main, argv)
