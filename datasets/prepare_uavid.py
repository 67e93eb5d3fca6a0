#!/usr/bin/env python
"""Prepare UAVid for segclip-d2: colour labels -> train ids, 1024x1024 patches + full frames.

Input (the official release, as extracted)::

    SRC/uavid_{train,val}/seqN/Images/000000.png
    SRC/uavid_{train,val}/seqN/Labels/000000.png     RGB colour labels
    SRC/uavid_test/seqN/Images/000000.png             (no labels)

Output (read by the ``uavid_*`` registrations)::

    DST/uavid/{train,val}/{images,labels}/seqN_000000_<y0>_<x0>.png   patches
    DST/uavid/val_full/{images,labels}/seqN_000000.png                 full frames (evaluation
                                                                        at full resolution)
    DST/uavid/test/images/seqN_000000.png                              full frames, unlabelled

Colours become train ids by exact match with the UAVid palette. Patches are ``--patch-size``
squares every ``--stride`` pixels (default 1024 / 1024); the last window of a row/column is shifted
inside the frame; frames smaller than a patch are padded (image 0, label 255 = ignore).

Usage::

    python datasets/prepare_uavid.py --src RAW_UAVID_DIR --dst ./datasets [--patch-size 1024]
        [--stride 1024] [--splits train val test] [--skip-bad] [--overwrite]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

try:
    import segclip_d2  # noqa: F401
except ImportError:  # running from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segclip_d2.data import prepare_utils as pu  # noqa: E402
from segclip_d2.data.dataset_facts import get_facts  # noqa: E402
from segclip_d2.data.prepare_utils import PrepareError, Source, run_cli  # noqa: E402

SPLITS = ("train", "val", "test")


def find_sources(src: Path, split: str) -> list[Source]:
    split_dir = src / f"uavid_{split}"
    if not split_dir.is_dir():
        raise PrepareError(
            f"{split_dir}: folder not found; expected the official UAVid layout "
            f"uavid_{split}/seqN/{{Images,Labels}}/*.png"
        )
    labelled = split != "test"
    sources = []
    for seq in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        img_dir = seq / "Images"
        if not img_dir.is_dir():
            raise PrepareError(f"{img_dir}: folder not found (every sequence has Images/)")
        for p in sorted(img_dir.glob("*.png")):
            stem = f"{seq.name}_{p.stem}"
            sources.append(
                Source(
                    source_id=stem,
                    image=p,
                    label=(seq / "Labels" / p.name) if labelled else None,
                    rel=str(p.relative_to(src)),
                )
            )
    pu.require_sources(sources, split_dir, "seqN/Images/*.png frames")
    return sources


def main(argv: list[str] | None = None) -> int:
    parser = pu.base_parser(__doc__.split("\n\n")[0])
    pu.add_splits_arg(parser, SPLITS, "default: every uavid_<split> folder found in --src")
    pu.add_patch_args(parser, patch_size=1024, stride=1024)
    parser.add_argument("--no-full-val", action="store_true", help="do not write val_full")
    args = parser.parse_args(argv)
    pu.check_patch_args(args)
    if not args.src.is_dir():
        raise PrepareError(f"{args.src}: UAVid source folder not found")
    pu.check_dst(args.dst)
    splits = args.splits or [s for s in SPLITS if (args.src / f"uavid_{s}").is_dir()]
    if not splits:
        raise PrepareError(f"{args.src}: no uavid_train/, uavid_val/ or uavid_test/ folder found")
    facts = get_facts("uavid")
    all_sources = {split: find_sources(args.src, split) for split in splits}  # verify first
    patch_opts = {"patch_size": args.patch_size, "stride": args.stride}
    summaries = []
    t0 = time.perf_counter()

    def patches(source: Source):
        return pu.patch_items(source, facts, args.patch_size, args.stride)

    def full_frame(source: Source):
        return pu.whole_image_items(source, facts)

    for split, sources in all_sources.items():
        jobs = []
        if split == "test":
            jobs.append(("test", False, {"full_frame": True}, full_frame))
        else:
            jobs.append((split, True, patch_opts, patches))
            if split == "val" and not args.no_full_val:
                jobs.append(("val_full", True, {"full_frame": True}, full_frame))
        for out_split, labelled, opts, make_items in jobs:
            writer = pu.SplitWriter(
                args.dst / "uavid" / out_split, facts, out_split, labelled, opts, args.overwrite
            )
            summaries.append(
                pu.run_split(writer, sources, make_items, args.skip_bad, f"UAVid {out_split}")
            )
    pu.print_done(facts, summaries, t0, args.dst)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
