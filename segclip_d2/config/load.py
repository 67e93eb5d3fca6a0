"""Reading a config file: safe YAML only (no Python tags), the ``_BASE_`` chain, unknown keys and
bad values reported as :class:`~segclip_d2.errors.UserError` naming the file or the key."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

from ..errors import UserError, did_you_mean, plain_message


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
        "fix the name (keys are listed by segclip_d2/config/defaults.py and detectron2's defaults)",
    )


_SPECIAL_KEYS = ("_BASE_", "VERSION")


def load_config(config_file: str, opts: Sequence[str] = (), cfg=None):
    """A detectron2 config with SegCLIP's keys, ``config_file`` and ``opts`` merged (not
    frozen). Every problem is a :class:`UserError` naming the YAML file or the key: missing or
    unparsable files (the ``_BASE_`` chain included), unknown keys with a "did you mean", an
    odd-length or unknown override list, values of the wrong type."""
    if cfg is None:
        from detectron2.config import get_cfg

        from .defaults import add_segclip_config

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
        raise UserError(config_file, plain_message(e), "fix the value in the YAML file") from None
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
                f"override {key}", plain_message(e), "give a value of the key's type"
            ) from None
    return cfg
