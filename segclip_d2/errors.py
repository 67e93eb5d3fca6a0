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
from collections.abc import Callable, Iterable, Iterator, Sequence

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


# --------------------------------------------------------------------------- config
def _yaml_chain(path: str, seen: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
    """``[(file, mapping)]`` of a config and its ``_BASE_`` files (base first); a missing or
    unparsable file is a :class:`UserError` naming it."""
    import yaml

    if not os.path.isfile(path):
        if seen:
            raise UserError(f"{seen[-1]}: _BASE_ {path}", "no such config file", "check the path")
        raise UserError(path, "no such config file", "check the --config-file path")
    if path in seen:
        raise UserError(path, "_BASE_ chain loops back to itself", "remove the cycle")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(path, f"not valid YAML{at} ({problem})", "fix the syntax") from None
    except OSError as e:
        raise UserError(path, f"cannot be read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise UserError(path, "a config file must be a mapping of keys", "see configs/")
    chain = []
    base = data.get("_BASE_")
    if base:
        base = os.path.expanduser(str(base))
        if not os.path.isabs(base):
            base = os.path.join(os.path.dirname(path), base)
        chain += _yaml_chain(base, (*seen, path))
    return chain + [(path, data)]


def _flat_keys(mapping: dict, prefix: str = "") -> Iterator[str]:
    for k, v in mapping.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            yield from _flat_keys(v, key + ".")
        else:
            yield key


def _unknown_key(cfg, key: str) -> str | None:
    """``None`` when ``key`` exists in ``cfg`` (or under a node that allows new keys), else the
    prefix of ``key`` that does not exist."""
    node = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict):
            return None  # a value given a sub-key: the merge reports the type
        if part not in node:
            if node.is_new_allowed() if hasattr(node, "is_new_allowed") else False:
                return None
            return ".".join(parts[: i + 1])
        node = node[part]
    return None


def _all_keys(cfg, prefix: str = "") -> Iterator[str]:
    for k, v in cfg.items():
        yield f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _all_keys(v, f"{prefix}{k}.")


def _key_error(cfg, key: str, where: str) -> UserError:
    bad = _unknown_key(cfg, key) or key
    hint = did_you_mean(bad, _all_keys(cfg))
    return UserError(
        where,
        f"unknown config key {key}" + (f" ({hint})" if hint else ""),
        "fix the name (keys are listed by segclip_d2/config.py and detectron2's defaults)",
    )


_SPECIAL_KEYS = ("_BASE_", "VERSION")


def load_config(config_file: str, opts: Sequence[str] = (), cfg=None):
    """A detectron2 config with SegCLIP's keys, ``config_file`` and ``opts`` merged (not
    frozen). Every problem is a :class:`UserError` naming the YAML file or the key: missing or
    unparsable files (the ``_BASE_`` chain included), unknown keys with a "did you mean", an
    odd-length or unknown override list, values of the wrong type."""
    if cfg is None:
        from detectron2.config import get_cfg

        from segclip_d2.config import add_segclip_config

        cfg = get_cfg()
        add_segclip_config(cfg)
    if not config_file:
        raise UserError("--config-file", "missing", "pass a config, e.g. configs/synthetic/...")
    for path, data in _yaml_chain(config_file):
        for key in _flat_keys(data):
            if key.split(".")[0] in _SPECIAL_KEYS:
                continue
            if _unknown_key(cfg, key) is not None:
                raise _key_error(cfg, key, path)
    try:
        cfg.merge_from_file(config_file)
    except (KeyError, ValueError, AssertionError, TypeError) as e:
        raise UserError(config_file, _plain(e), "fix the value in the YAML file") from None
    opts = list(opts or [])
    if len(opts) % 2:
        raise UserError(
            "config overrides",
            f"odd number of items ({' '.join(map(str, opts))}): each KEY needs a VALUE",
            "write KEY VALUE pairs, e.g. MODEL.WEIGHTS model_final.pth",
        )
    for key, value in zip(opts[::2], opts[1::2]):
        if _unknown_key(cfg, key) is not None:
            raise _key_error(cfg, key, f"override {key}")
        try:
            cfg.merge_from_list([key, value])
        except (KeyError, ValueError, AssertionError, TypeError) as e:
            raise UserError(
                f"override {key}", _plain(e), "give a value of the key's type"
            ) from None
    return cfg


def _plain(e: BaseException) -> str:
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
        raise UserError(key, _plain(e)) from None
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
