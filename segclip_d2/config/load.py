"""Reading a config file: safe YAML only (no Python tags), the ``_BASE_`` chain, unknown keys and
bad values reported as :class:`~segclip_d2.errors.UserError` naming the file or the key."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

from ..errors import UserError, did_you_mean, plain_message


def parse_yaml_text(text, where: str) -> dict:
    """A YAML mapping parsed with the safe loader (plain values only: a Python tag such as
    ``!!python/object/apply:os.system`` is an error, never run); a :class:`UserError` naming
    ``where`` when it is not valid YAML or not a mapping. ``text``: a string or an open file."""
    import yaml

    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        if "python/" in str(e) or "could not determine a constructor" in str(problem):
            raise UserError(
                where, f"holds a Python tag{at} ({problem}): refused, it could run code",
                "configs hold plain values only",
            ) from None  # fmt: skip
        raise UserError(where, f"not valid YAML{at} ({problem})", "fix the syntax") from None
    if not isinstance(data, dict):
        raise UserError(where, "a config file must be a mapping of keys", "see configs/")
    return data


def _yaml_chain(path: str, seen: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
    """``[(file, mapping)]`` of a config and its ``_BASE_`` files (base first); a missing or
    unparsable file is a :class:`UserError` naming it."""
    if not os.path.isfile(path):
        if seen:
            raise UserError(f"{seen[-1]}: _BASE_ {path}", "no such config file", "check the path")
        raise UserError(path, "no such config file", "check the --config-file path")
    if path in seen:
        raise UserError(path, "_BASE_ chain loops back to itself", "remove the cycle")
    try:
        with open(path) as f:
            data = parse_yaml_text(f, path)
    except OSError as e:
        raise UserError(path, f"cannot be read ({e.strerror or e})") from None
    chain = []
    base = data.get("_BASE_")
    if base:
        base = os.path.expanduser(str(base))
        if not os.path.isabs(base):
            base = os.path.join(os.path.dirname(path), base)
        chain += _yaml_chain(base, (*seen, path))
    return chain + [(path, data)]


def _deep_merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``: mappings merged key by key, other values replaced."""
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _merge_mapping(cfg, data: dict, where: str) -> None:
    """Merge a parsed config mapping into ``cfg`` as detectron2's ``merge_from_file`` does
    (older ``VERSION`` configs upgraded), without reading any file again."""
    from detectron2.config import CfgNode

    data = {k: v for k, v in data.items() if k != "_BASE_"}
    try:
        loaded = CfgNode(data)
        version = loaded.get("VERSION", cfg.VERSION)
        if version == cfg.VERSION:
            cfg.merge_from_other_cfg(loaded)
            return
        from detectron2.config.compat import downgrade_config, upgrade_config

        old = downgrade_config(cfg, to_version=version)
        old.merge_from_other_cfg(loaded)
        new = upgrade_config(old)
        cfg.clear()
        cfg.update(new)
    except (KeyError, ValueError, AssertionError, TypeError) as e:
        raise UserError(where, plain_message(e), "fix the value in the YAML file") from None


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


def _retired(cfg, key: str) -> bool:
    """A key removed or renamed by a later version (the merge handles it)."""
    deprecated = getattr(cfg, "key_is_deprecated", None)
    renamed = getattr(cfg, "key_is_renamed", None)
    return bool(deprecated and deprecated(key)) or bool(renamed and renamed(key))


def _check_keys(cfg, chain: list[tuple[str, dict]]) -> None:
    for path, data in chain:
        for key in _flat_keys(data):
            if key.split(".")[0] in _SPECIAL_KEYS or _retired(cfg, key):
                continue  # the merge warns about removed keys / names the new one
            if _unknown_key(cfg, key) is not None:
                raise _key_error(cfg, key, path)


def _merge_opts(cfg, opts: Sequence[str]) -> None:
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


def _default_cfg():
    from detectron2.config import get_cfg

    from .defaults import add_segclip_config

    cfg = get_cfg()
    add_segclip_config(cfg)
    return cfg


def load_config(config_file: str, opts: Sequence[str] = (), cfg=None):
    """A detectron2 config with SegCLIP's keys, ``config_file`` and ``opts`` merged (not
    frozen). Every file of the ``_BASE_`` chain is parsed once, with the safe YAML loader, and
    the parsed mappings are merged (no file is read twice, no Python tag is ever run). Every
    problem is a :class:`UserError` naming the YAML file or the key: missing or unparsable files,
    Python tags, unknown keys with a "did you mean", an odd-length or unknown override list,
    values of the wrong type."""
    cfg = _default_cfg() if cfg is None else cfg
    if not config_file:
        raise UserError("--config-file", "missing", "pass a config, e.g. configs/synthetic/...")
    chain = _yaml_chain(config_file)
    _check_keys(cfg, chain)
    merged: dict = {}
    for _, data in chain:
        merged = _deep_merge(merged, data)
    _merge_mapping(cfg, merged, config_file)
    _merge_opts(cfg, opts)
    return cfg


def load_config_text(text: str, where: str, opts: Sequence[str] = (), cfg=None):
    """:func:`load_config` for config YAML held as text, e.g. the ``config`` of a model card
    (``where`` names its source in errors); ``_BASE_`` is not followed."""
    cfg = _default_cfg() if cfg is None else cfg
    data = parse_yaml_text(text, where)
    if data.get("_BASE_"):
        raise UserError(where, "a stored config cannot have a _BASE_", "store the full config")
    _check_keys(cfg, [(where, data)])
    _merge_mapping(cfg, data, where)
    _merge_opts(cfg, opts)
    return cfg
