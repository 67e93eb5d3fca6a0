#!/usr/bin/env python
"""Prepare iSAID for segclip-d2: DOTA images + iSAID colour masks -> train-id patches.

Input (the official release, as extracted)::

    SRC/{train,val}/images/P0000.png
    SRC/{train,val}/Semantic_masks/images/P0000_instance_color_RGB.png
    SRC/test/images/P0006.png                     (optional, unlabelled; --splits test)

Output (read by the ``isaid_<split>`` registrations)::

    DST/isaid/<split>/{images,labels}/P0000_<y0>_<x0>.png   + manifest.json (written last)

Colours become train ids by exact palette match (a colour outside the palette is an error naming
the file, the pixel count and the colour). Images are cut into ``--patch-size`` windows every
``--stride`` pixels; the last window of a row/column is shifted inside the image, so no window
sticks out. An image smaller than the patch along a side is padded (image with 0, label with
255 = ignore) to the full patch size, so every patch has the same size.

Usage::

    python datasets/prepare_isaid.py --src RAW_ISAID_DIR --dst ./datasets [--patch-size 896]
        [--stride 512] [--splits train val] [--skip-bad] [--overwrite]
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
MASK_SUFFIX = "_instance_color_RGB.png"


def find_sources(src: Path, split: str) -> list[Source]:
    img_dir = src / split / "images"
    if not img_dir.is_dir():
        raise PrepareError(
            f"{img_dir}: folder not found; expected the official iSAID layout "
            f"{split}/images/P*.png and {split}/Semantic_masks/images/P*{MASK_SUFFIX}"
        )
    images = sorted(p for p in img_dir.glob("P*.png") if "_instance" not in p.name)
    pu.require_sources(images, img_dir, "P*.png images")
    mask_dir = src / split / "Semantic_masks" / "images"
    labelled = split != "test"
    return [
        Source(
            source_id=p.stem,
            image=p,
            label=(mask_dir / f"{p.stem}{MASK_SUFFIX}") if labelled else None,
            rel=str(p.relative_to(src)),
        )
        for p in images
    ]


def main(argv: list[str] | None = None) -> int:
    parser = pu.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--splits", nargs="+", default=["train", "val"], choices=SPLITS)
    pu.add_patch_args(parser, patch_size=896, stride=512)
    args = parser.parse_args(argv)
    pu.check_patch_args(args)
    if not args.src.is_dir():
        raise PrepareError(f"{args.src}: iSAID source folder not found")
    pu.check_dst(args.dst)
    facts = get_facts("isaid")
    # Verify the whole layout before writing anything.
    all_sources = {split: find_sources(args.src, split) for split in args.splits}
    options = {"patch_size": args.patch_size, "stride": args.stride}
    summaries = []
    t0 = time.perf_counter()
    for split, sources in all_sources.items():
        labelled = split != "test"
        writer = pu.SplitWriter(
            args.dst / "isaid" / split, facts, split, labelled, options, args.overwrite
        )

        def make_items(source: Source):
            return pu.patch_items(source, facts, args.patch_size, args.stride)

        summaries.append(pu.run_split(writer, sources, make_items, args.skip_bad, f"iSAID {split}"))
    pu.print_done(facts, summaries, t0, args.dst)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
