#!/usr/bin/env python
"""Print the model card of a trained checkpoint (or of an exported ONNX file).

    python tools/model_card.py output/loveda_R50/model_best.pth
    python tools/model_card.py model.onnx [--json]

Shows the classes with their colours and prompts, the ground sample distance, the training data
and input size, the text encoder and its stored class embeddings, and the evaluation metrics at
save time when known. ``--json`` prints the card itself (without the config YAML unless
``--config``). A missing or unreadable file: one ``error:`` line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segclip_d2.checkpoint.card import format_model_card  # noqa: E402
from segclip_d2.errors import ArgumentParser, UserError, run_main  # noqa: E402


def load_card(path: str) -> dict:
    """The card of a checkpoint or ONNX file, read by the project's one safe reader (no pickle
    runs code, the stored config must be plain YAML)."""
    from segclip_d2.checkpoint.card import read_model_card, read_onnx_card

    if path.endswith(".onnx"):
        return read_onnx_card(path)
    card, rest = read_model_card(path)
    if card is None:
        raise UserError(
            path,
            f"has no model card (written before cards existed; entries: {sorted(rest)})",
            "checkpoints saved by this version's training carry one",
        )
    return card


def _main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint", help="model_*.pth / model_best.pth, or an exported .onnx")
    p.add_argument("--json", action="store_true", help="print the card as JSON")
    p.add_argument("--config", action="store_true", help="also print the training config YAML")
    args = p.parse_args(argv)
    card = load_card(args.checkpoint)
    if args.json:
        shown = card if args.config else {k: v for k, v in card.items() if k != "config"}
        print(json.dumps(shown, indent=1))
        return 0
    print(format_model_card(card, args.checkpoint))
    if args.config:
        print("  config:\n" + "\n".join("    " + line for line in card["config"].splitlines()))
    return 0


def main(argv=None) -> int:
    """The tool under the error contract: 0, or 2 with one ``error:`` line."""
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
