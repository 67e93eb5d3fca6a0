"""The config namespace: every YAML parses, every key the project adds is read by some code,
and a key that does not exist is an error rather than a silent default."""

import re
from pathlib import Path

import pytest
from detectron2.config import CfgNode, get_cfg

from segclip_d2 import add_segclip_config

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPO / "configs").rglob("*.yaml"))


def _flatten(node: CfgNode, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, CfgNode):
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _added_keys() -> list[str]:
    base = _flatten(get_cfg())
    cfg = get_cfg()
    add_segclip_config(cfg)
    return sorted(k for k in _flatten(cfg) if k not in base)


def test_config_files_exist():
    names = {p.relative_to(REPO / "configs").as_posix() for p in CONFIG_FILES}
    for required in (
        "Base-SegCLIP.yaml",
        "loveda/segclip_R50.yaml",
        "isaid/segclip_R50.yaml",
        "uavid/segclip_R50.yaml",
    ):
        assert required in names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_yaml_loads(path):
    cfg = get_cfg()
    add_segclip_config(cfg)
    cfg.merge_from_file(str(path))
    assert cfg.MODEL.META_ARCHITECTURE == "SegCLIP"
    assert cfg.INPUT.FORMAT == "RGB"
    text = path.read_text()
    assert "!!python" not in text, "no Python evaluated inside YAML"
    # At most three levels of _BASE_ (this file + two bases above it).
    depth, current = 0, path
    while True:
        m = re.search(r"^_BASE_:\s*\"?([^\"\n]+)\"?", current.read_text(), re.M)
        if not m:
            break
        current = (current.parent / m.group(1).strip()).resolve()
        depth += 1
    assert depth <= 2, f"{path}: {depth} levels of _BASE_"


def test_every_added_key_has_a_comment():
    source = (REPO / "segclip_d2" / "config.py").read_text().splitlines()
    for i, line in enumerate(source):
        m = re.match(r"\s*cfg\.([A-Z0-9_.]+) = (?!CN\(\))", line)
        if m:
            assert source[i - 1].strip().startswith("#"), (
                f"config.py:{i + 1} {m.group(1)} lacks a comment"
            )


def test_every_added_key_is_read_by_code():
    sources = []
    for py in list((REPO / "segclip_d2").rglob("*.py")) + [
        REPO / "train_net.py",
        *(REPO / "demo").glob("*.py"),
        *(REPO / "tools").glob("*.py"),
    ]:
        if py.name == "config.py" or not py.exists():
            continue
        sources.append(py.read_text())
    code = "\n".join(sources)
    unread = []
    for key in _added_keys():
        parent, leaf = key.split(".")[-2:]
        # A key counts as read when code names it by its last two path components
        # ("TEXT.PROMPT_TEMPLATE"), or reads the attribute from an alias of its parent node
        # (`text = cfg.MODEL.SEGCLIP.TEXT` ... `text.PROMPT_TEMPLATE`).
        direct = f"{parent}.{leaf}" in code
        via_alias = re.search(rf"\w\.{leaf}\b", code) and re.search(rf"\.{parent}\b", code)
        if not (direct or via_alias):
            unread.append(key)
    assert not unread, f"config keys never read by any code: {unread}"


def test_unknown_key_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  SEGCLIP:\n    NUM_QUERIS: 50\n")
    cfg = get_cfg()
    add_segclip_config(cfg)
    with pytest.raises(KeyError, match="NUM_QUERIS"):
        cfg.merge_from_file(str(bad))
    # Command-line overrides go through yacs, which asserts on unknown keys.
    with pytest.raises(AssertionError, match="Non-existent key: MODEL.SEGCLIP.TEXT.TEMPLATE"):
        cfg.merge_from_list(["MODEL.SEGCLIP.TEXT.TEMPLATE", "x"])
