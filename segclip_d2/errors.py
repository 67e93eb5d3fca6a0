"""One error contract for every entry point (train_net.py, demo/demo.py, datasets/, tools/).

A *user error* (bad argument, config file, key or value, unknown dataset, missing or corrupt
file, unwritable output) is raised as :class:`UserError`. :func:`run_main` turns it into one line

    error: <file or key>: <what is wrong>; <what to do>

on stderr and exit status 2, with no traceback unless ``--debug`` is on the command line or
``SEGCLIP_DEBUG=1`` is set. Anything else is a bug and keeps its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence

USER_ERROR_EXIT = 2


class UserError(Exception):
    """A problem the user can fix. ``where`` is the file or config key, ``what`` the problem,
    ``fix`` what to do about it (optional)."""

    def __init__(self, where: str, what: str, fix: str | None = None):
        self.where, self.what, self.fix = str(where), str(what), fix
        super().__init__(self.line())

    def line(self) -> str:
        text = f"{self.where}: {self.what}" if self.where else self.what
        return f"{text}; {self.fix}" if self.fix else text


def debug_enabled(argv: Sequence[str] | None = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get("SEGCLIP_DEBUG", "") not in ("", "0")


def report(err: UserError, argv: Sequence[str] | None = None) -> int:
    """Print ``err`` as the one-line contract (plus its traceback under debug); return 2."""
    if debug_enabled(argv):
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    print(f"error: {err.line()}", file=sys.stderr, flush=True)
    return USER_ERROR_EXIT


def run_main(main: Callable[..., int | None], argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)`` and apply the contract; returns the process exit status."""
    try:
        rc = main(argv) if argv is not None else main()
    except UserError as err:
        return report(err, argv)
    return int(rc or 0)


# --------------------------------------------------------------------------- suggestions
def closest(name: str, choices: Iterable[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """Up to ``n`` of ``choices`` that look like ``name``, closest first."""
    return difflib.get_close_matches(name, list(choices), n=n, cutoff=cutoff)


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``'did you mean X?'`` for the closest of ``choices``, or ``''``."""
    best = closest(name, choices, n=1)
    return f"did you mean {best[0]}?" if best else ""


def ranked(name: str, choices: Iterable[str], n: int = 8) -> list[str]:
    """``choices`` ordered by similarity to ``name`` (closest first), at most ``n``."""
    choices = sorted(set(choices))
    score = {c: difflib.SequenceMatcher(None, name.lower(), c.lower()).ratio() for c in choices}
    return sorted(choices, key=lambda c: -score[c])[:n]


# --------------------------------------------------------------------------- argparse
class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors follow the contract (one line, exit 2)
    and which accepts ``--debug`` (tracebacks for user errors)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        add_debug_argument(self)

    def error(self, message):
        raise UserError("command line", message, f"see {self.prog} --help")


def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    if not any("--debug" in a.option_strings for a in parser._actions):
        parser.add_argument(
            "--debug",
            action="store_true",
            help="show the traceback of user errors too (or set SEGCLIP_DEBUG=1)",
        )


def contract_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make an existing parser (e.g. detectron2's) follow the contract, in place."""
    add_debug_argument(parser)

    def error(message):
        raise UserError("command line", message, f"see {parser.prog} --help")

    parser.error = error
    return parser


def plain_message(e: BaseException) -> str:
    text = e.args[0] if len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
    return " ".join(str(text).split())


# --------------------------------------------------------------------------- pre-flight checks
def check_datasets(names: Iterable[str], key: str) -> None:
    """Every name in config key ``key`` (e.g. ``DATASETS.TEST``) is a registered dataset."""
    from detectron2.data import DatasetCatalog

    registered = DatasetCatalog.list()
    for name in names:
        if name not in registered:
            raise UserError(
                key,
                f"unknown dataset {name!r}",
                "registered datasets, closest first: " + ", ".join(ranked(name, registered)),
            )


def check_dataset_present(name: str, key: str) -> None:
    """Dataset ``name`` can be listed (its folders exist, prepared completely)."""
    from detectron2.data import DatasetCatalog

    try:
        records = DatasetCatalog.get(name)
    except UserError:
        raise
    except FileNotFoundError as e:
        raise UserError(key, plain_message(e)) from None
    if not records:
        raise UserError(key, f"dataset {name!r} has no images", "prepare it (see README)")


def check_writable_dir(path: str | os.PathLike, what: str) -> None:
    """``path`` is a folder that exists and can be written, or can be created; nothing is
    created here."""
    p = os.path.abspath(os.fspath(path))
    if os.path.exists(p) and not os.path.isdir(p):
        raise UserError(f"{what} {path}", "exists and is not a folder", "choose a folder")
    probe = p
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise UserError(f"{what} {path}", f"{probe} is not a folder", "choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(
            f"{what} {path}",
            f"cannot write to {probe} (permission denied)",
            "choose a folder you can write to",
        )


def check_weights_file(weights: str, key: str = "MODEL.WEIGHTS") -> None:
    """A local ``weights`` path exists and is a non-empty file (remote URLs are checked when
    downloaded)."""
    if not weights or ("://" in weights and not weights.startswith("file://")):
        return
    path = weights[len("file://") :] if weights.startswith("file://") else weights
    if not os.path.exists(path):
        raise UserError(
            f"{key} {weights}", "no such file", "pass a trained checkpoint (e.g. model_final.pth)"
        )
    if os.path.isdir(path):
        raise UserError(f"{key} {weights}", "is a folder", "pass the checkpoint file in it")
    if os.path.getsize(path) == 0:
        raise UserError(f"{key} {weights}", "is empty (0 bytes)", "copy the checkpoint again")
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"  # torch's checkpoint format is a zip archive
    if zipped:
        import zipfile

        try:
            with zipfile.ZipFile(path) as zf:
                zf.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise UserError(
                path,
                f"cannot be read as a checkpoint, it is truncated or corrupt ({e})",
                "copy it again or use another checkpoint",
            ) from None


RANDOM_WEIGHTS_FIX = (
    "pass trained weights (MODEL.WEIGHTS path/to/model_final.pth), or --allow-random-weights "
    "to run a randomly initialised model anyway (its predictions are meaningless)"
)


def check_trained_weights(weights: str, allow_random: bool, resumable: bool = False) -> None:
    """Refuse a model without trained weights unless ``allow_random`` (``--allow-random-
    weights``); ``resumable`` when ``--resume`` will load a checkpoint of OUTPUT_DIR."""
    if weights or resumable or allow_random:
        return
    raise UserError(
        "MODEL.WEIGHTS", "empty: the model would be randomly initialised", RANDOM_WEIGHTS_FIX
    )
