#!/usr/bin/env python
"""Prepare LoveDA for segclip-d2: raw 0..7 masks -> train ids, domains kept addressable.

Input (the official release, as extracted from Train.zip / Val.zip / Test.zip)::

    SRC/{Train,Val}/{Urban,Rural}/images_png/<id>.png
    SRC/{Train,Val}/{Urban,Rural}/masks_png/<id>.png    0 = no-data, 1..7 = classes
    SRC/Test/{Urban,Rural}/images_png/<id>.png           (no masks: labels are withheld)

Output (read by the ``loveda_*`` registrations)::

    DST/loveda/{train,val,test}/images/<domain>_<id>.png
    DST/loveda/{train,val}/labels/<domain>_<id>.png      0 -> 255 (ignore), 1..7 -> 0..6
    DST/loveda/<split>/manifest.json                     written last; maps stems to sources

Stems are prefixed with the lower-case domain (``urban_1366``) so they are unique across domains;
``loveda_<split>_urban`` / ``loveda_<split>_rural`` select a domain by that prefix, and the
test-server writer recovers the original file name from the manifest.

``--download`` fetches the official archives from the LoveDA Zenodo record
(https://zenodo.org/records/5706578, DOI 10.5281/zenodo.5706578) into SRC, verifies their size
and MD5 and extracts them:

    Train.zip  4,021,669,263 bytes  md5 de2b196043ed9b4af1690b3f9a7d558f
    Val.zip    2,425,958,254 bytes  md5 84cae2577468ff0b5386758bb386d31d
    Test.zip   3,126,023,212 bytes  md5 a489be0090465e01fb067795d24e6b47

Usage::

    python datasets/prepare_loveda.py --src RAW_LOVEDA_DIR --dst ./datasets [--download]
        [--splits train val test] [--skip-bad] [--overwrite]
"""

from __future__ import annotations

import shutil
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

try:
    import segclip_d2  # noqa: F401
except ImportError:  # running from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm  # noqa: E402

from segclip_d2.data import prepare_utils as pu  # noqa: E402
from segclip_d2.data.dataset_facts import get_facts  # noqa: E402
from segclip_d2.data.prepare_utils import PrepareError, Source, run_cli  # noqa: E402

SPLIT_DIRS = {"train": "Train", "val": "Val", "test": "Test"}
DOMAINS = ("Urban", "Rural")
ZENODO_URL = "https://zenodo.org/records/5706578/files"
# archive name -> (size in bytes, md5), as published on the Zenodo record
ARCHIVES = {
    "Train.zip": (4021669263, "de2b196043ed9b4af1690b3f9a7d558f"),
    "Val.zip": (2425958254, "84cae2577468ff0b5386758bb386d31d"),
    "Test.zip": (3126023212, "a489be0090465e01fb067795d24e6b47"),
}


# --------------------------------------------------------------------------- download
def _archive_url(base: str, name: str) -> str:
    url = f"{base.rstrip('/')}/{name}"
    return url + "?download=1" if url.startswith(("http://", "https://")) else url


def _verify_archive(path: Path, size: int | None, md5: str) -> None:
    if size is not None and path.stat().st_size != size:
        raise PrepareError(
            f"{path}: size {path.stat().st_size} bytes, expected {size} (incomplete download?)"
        )
    got = pu.file_digest(path, "md5")
    if got != md5:
        raise PrepareError(f"{path}: md5 {got} does not match the published {md5}")


def download_archive(name: str, dest_dir: Path, base_url: str, size: int | None, md5: str) -> Path:
    """Download ``name`` to ``dest_dir`` (via ``<name>.part``), verify, and return its path.

    An archive already present and passing verification is reused.
    """
    dest = dest_dir / name
    if dest.is_file():
        _verify_archive(dest, size, md5)
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    part = dest_dir / f"{name}.part"
    url = _archive_url(base_url, name)
    try:
        with urllib.request.urlopen(url) as resp, open(part, "wb") as out:
            total = resp.headers.get("Content-Length")
            bar = tqdm(total=int(total) if total else None, unit="B", unit_scale=True, desc=name)
            while block := resp.read(1 << 20):
                out.write(block)
                bar.update(len(block))
            bar.close()
        _verify_archive(part, size, md5)
    except (OSError, PrepareError) as e:
        part.unlink(missing_ok=True)
        if isinstance(e, PrepareError):
            raise
        raise PrepareError(f"{url}: download failed ({e})") from e
    part.replace(dest)
    return dest


def extract_archive(archive: Path, dest_dir: Path) -> None:
    """Extract a zip into ``dest_dir`` (refusing members that would land outside it).

    Only what the archive brings is added: a top-level folder that is new moves in whole; one
    that already exists (the user's ``Val/`` next to the ``Train/`` being downloaded) only gains
    the archive's files it lacks. Nothing that exists is deleted or replaced.
    """
    root = dest_dir.resolve()
    tmp = dest_dir / f".{archive.stem}.extracting"
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                target = (root / member).resolve()
                if root != target and root not in target.parents:
                    raise PrepareError(f"{archive}: member {member!r} escapes the target folder")
            if tmp.exists():  # our own leftover of an interrupted extraction
                shutil.rmtree(tmp)
            zf.extractall(tmp)
    except zipfile.BadZipFile as e:
        raise PrepareError(f"{archive}: not a valid zip archive ({e})") from e
    kept = sum(_move_missing(child, dest_dir / child.name) for child in tmp.iterdir())
    if kept:
        print(f"{archive.name}: kept {kept} existing file(s) in {dest_dir}, not replaced")
    shutil.rmtree(tmp)


def _move_missing(src: Path, dst: Path) -> int:
    """Move ``src`` to ``dst`` where ``dst`` does not exist, merging folders; returns how many
    existing files were kept (the extracted copy is dropped)."""
    if not dst.exists() and not dst.is_symlink():
        src.replace(dst)
        return 0
    if not (src.is_dir() and dst.is_dir()):
        return 1
    return sum(_move_missing(child, dst / child.name) for child in src.iterdir())


def download_splits(
    src: Path, splits: list[str], base_url: str, md5_overrides: dict[str, str]
) -> None:
    for split in splits:
        folder = SPLIT_DIRS[split]
        if (src / folder).is_dir():
            print(f"{src / folder} exists, not downloading {folder}.zip")
            continue
        name = f"{folder}.zip"
        size, md5 = ARCHIVES[name]
        if name in md5_overrides:  # e.g. a mirror or a test archive: size is not known
            size, md5 = None, md5_overrides[name]
        archive = download_archive(name, src, base_url, size, md5)
        extract_archive(archive, src)
        if not (src / folder).is_dir():
            raise PrepareError(f"{archive}: extracted, but {src / folder} was not created")


# --------------------------------------------------------------------------- sources
def find_sources(src: Path, split: str) -> list[Source]:
    split_dir = src / SPLIT_DIRS[split]
    labelled = split != "test"
    sources = []
    for domain in DOMAINS:
        img_dir = split_dir / domain / "images_png"
        if not img_dir.is_dir():
            raise PrepareError(
                f"{img_dir}: folder not found; expected the official LoveDA layout "
                f"{SPLIT_DIRS[split]}/{{Urban,Rural}}/{{images_png,masks_png}}"
            )
        images = sorted(img_dir.glob("*.png"))
        pu.require_sources(images, img_dir, "PNG images")
        mask_dir = split_dir / domain / "masks_png"
        for p in images:
            stem = f"{domain.lower()}_{p.stem}"
            sources.append(
                Source(
                    source_id=stem,
                    image=p,
                    label=(mask_dir / p.name) if labelled else None,
                    rel=str(p.relative_to(src)),
                    info={"domain": domain.lower()},
                )
            )
    return sources


def _md5_overrides(items: list[str]) -> dict[str, str]:
    """``--expected-md5 NAME=MD5`` items as ``{NAME: md5}``."""
    overrides = {}
    for item in items:
        name, sep, md5 = item.partition("=")
        if not sep or name not in ARCHIVES:
            raise PrepareError(
                f"--expected-md5 {item!r}: use NAME=MD5 with NAME in {list(ARCHIVES)}"
            )
        overrides[name] = md5.lower()
    return overrides


def _splits_found(src: Path) -> list[str]:
    """The splits whose release folder is in ``src`` (a note names the missing ones)."""
    splits = [s for s, d in SPLIT_DIRS.items() if (src / d).is_dir()]
    if not splits:
        raise PrepareError(
            f"{src}: none of Train/, Val/, Test/ found; expected the official LoveDA layout"
        )
    missing = [SPLIT_DIRS[s] for s in SPLIT_DIRS if s not in splits]
    if missing:
        print(f"note: {', '.join(missing)} not found in {src}; preparing {splits}")
    return splits


def main(argv: list[str] | None = None) -> int:
    parser = pu.base_parser(__doc__.split("\n\n")[0])
    pu.add_splits_arg(
        parser, SPLIT_DIRS, "default: every split found in --src (all three with --download)"
    )
    parser.add_argument("--download", action="store_true", help="download the archives to --src")
    parser.add_argument(
        "--download-url", default=ZENODO_URL, help="base URL of the archives (a mirror, file://)"
    )
    parser.add_argument(
        "--expected-md5",
        action="append",
        default=[],
        metavar="NAME=MD5",
        help="override the published checksum of an archive (e.g. Train.zip=...)",
    )
    args = parser.parse_args(argv)
    facts = get_facts("loveda")
    src: Path = args.src
    pu.check_dst(args.dst)
    if args.download:
        overrides = _md5_overrides(args.expected_md5)
        download_splits(src, args.splits or list(SPLIT_DIRS), args.download_url, overrides)
    if not src.is_dir():
        raise PrepareError(f"{src}: LoveDA source folder not found (use --download to fetch it)")
    splits = args.splits or _splits_found(src)
    all_sources = {split: find_sources(src, split) for split in splits}  # verify layout first
    summaries = []
    t0 = time.perf_counter()
    for split, sources in all_sources.items():
        writer = pu.SplitWriter(
            args.dst / "loveda" / split,
            facts,
            split,
            labelled=split != "test",
            options={"layout": "loveda-v1"},
            overwrite=args.overwrite,
        )
        summaries.append(
            pu.run_split(
                writer,
                sources,
                lambda s: pu.whole_image_items(s, facts),
                args.skip_bad,
                f"LoveDA {split}",
            )
        )
    pu.print_done(facts, summaries, t0, args.dst)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
