#!/usr/bin/env python
"""Generate the built-in synthetic aerial dataset (LoveDA's seven classes) and summarise it.

    python datasets/prepare_synthetic.py --dst $DETECTRON2_DATASETS [--num-train 64 --num-val 16
        --size 512 --seed 0 --force]

Writes ``<dst>/synthetic_aerial/{train,val}/{images,labels}/<stem>.png`` and prints the number of
tiles, the generation time and each class's share of the labelled pixels. Registration generates
the same set on first use, so running this is optional; it is the place to pick other sizes.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segclip_d2.data.dataset_facts import get_facts  # noqa: E402
from segclip_d2.data.synthetic import (  # noqa: E402
    DEFAULTS,
    SPLITS,
    class_histogram,
    ensure_synthetic_aerial,
)
from segclip_d2.errors import ArgumentParser, UserError, check_writable_dir, run_main  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dst", required=True, type=Path, help="datasets root (DETECTRON2_DATASETS)"
    )
    parser.add_argument("--num-train", type=int, default=DEFAULTS["num_train"])
    parser.add_argument("--num-val", type=int, default=DEFAULTS["num_val"])
    parser.add_argument("--size", type=int, default=DEFAULTS["size"], help="tile side in pixels")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--force", action="store_true", help="regenerate even if it is complete")
    return parser.parse_args(argv)


def summarize(out: Path) -> str:
    """A text table: tiles per split and the class pixel histogram in percent."""
    facts = get_facts("synthetic_aerial")
    names = list(facts.classes) + ["(no data)"]
    hists = {split: class_histogram(out, split) for split in SPLITS}
    width = max(len(n) for n in names)
    lines = [f"{'class':<{width}}  " + "  ".join(f"{s:>7}" for s in SPLITS)]
    for i, name in enumerate(names):
        cells = "  ".join(f"{100.0 * hists[s][i] / max(hists[s].sum(), 1):6.2f}%" for s in SPLITS)
        lines.append(f"{name:<{width}}  {cells}")
    tiles = ", ".join(f"{len(list((out / s / 'images').glob('*.png')))} {s}" for s in SPLITS)
    return f"{out}: {tiles} tiles\n" + "\n".join(lines)


def _main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    check_writable_dir(args.dst, "--dst")
    start = time.perf_counter()
    try:
        out = ensure_synthetic_aerial(
            args.dst,
            num_train=args.num_train,
            num_val=args.num_val,
            size=args.size,
            seed=args.seed,
            force=args.force,
        )
    except (ValueError, OSError) as e:
        raise UserError(f"--dst {args.dst}", " ".join(str(e).split())) from e
    print(f"ready in {time.perf_counter() - start:.1f} s")
    print(summarize(out))
    return 0


def main(argv=None) -> int:
    """Under the error contract: 0, or 2 with one line ``error: ...`` on stderr."""
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
