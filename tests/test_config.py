"""The config namespace: every YAML parses; every key the project adds, and every key a YAML
sets, is read (recorded while the model, trainer, loaders, mappers, evaluator and inferencer are
built from each YAML); a key that does not exist is an error rather than a silent default."""

import re
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from detectron2.config import CfgNode, get_cfg

from segclip_d2 import add_segclip_config
from segclip_d2.checkpoint import pretrained as weights
from segclip_d2.config import load_config
from segclip_d2.errors import UserError

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
    cfg = load_config(str(path))
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
    source = (REPO / "segclip_d2" / "config" / "defaults.py").read_text().splitlines()
    for i, line in enumerate(source):
        m = re.match(r"\s*cfg\.([A-Z0-9_.]+) = (?!CN\(\))", line)
        if m:
            assert source[i - 1].strip().startswith("#"), (
                f"config/defaults.py:{i + 1} {m.group(1)} lacks a comment"
            )


class ConfigReads:
    """Records every key read from a config tree: attribute reads (``cfg.MODEL.SEGCLIP``),
    ``cfg["KEY"]`` and ``cfg.get("KEY")``, on the tree and on its clones.

    Installed by patching detectron2's ``CfgNode`` for the duration of a test; each node of the
    tree is tagged with its dotted path (in its ``__dict__``, which ``clone`` copies), so a read
    is recorded as the full key ("MODEL.SEGCLIP.GT_GUIDANCE.ENABLED").
    """

    PATH = "_recorded_path"

    def __init__(self, monkeypatch):
        self.keys: set[str] = set()
        recorder = self
        base_getattr = CfgNode.__getattr__

        def getattr_(node, name):
            value = base_getattr(node, name)  # AttributeError for a missing key, as before
            recorder._record(node, name)
            return value

        def getitem_(node, key):
            value = dict.__getitem__(node, key)
            recorder._record(node, key)
            return value

        def get_(node, key, default=None):
            if key in node:
                recorder._record(node, key)
            return dict.get(node, key, default)

        monkeypatch.setattr(CfgNode, "__getattr__", getattr_)
        monkeypatch.setattr(CfgNode, "__getitem__", getitem_)
        monkeypatch.setattr(CfgNode, "get", get_)

    def _record(self, node, key) -> None:
        prefix = node.__dict__.get(self.PATH)
        if prefix is not None and isinstance(key, str):
            self.keys.add(prefix + key)

    def tag(self, node: CfgNode, prefix: str = "") -> CfgNode:
        """Tags ``node`` and every node below it with its path; returns ``node``."""
        node.__dict__[self.PATH] = prefix
        for key, value in dict.items(node):
            if isinstance(value, CfgNode):
                self.tag(value, f"{prefix}{key}.")
        return node


def _load(path: Path) -> CfgNode:
    return load_config(str(path))


def _build_everything(cfg: CfgNode, output_dir: Path, monkeypatch) -> None:
    """What training, evaluation and the demo build from a config: the trainer (model,
    optimizer, gradient clipper, LR scheduler, checkpointer, hooks) and its weight loading, the
    inferencer, the train loader and mapper, the test mapper and evaluator of every test set.
    Only the data and weight files are left out (the datasets are not prepared here)."""
    import segclip_d2.engine.data as engine_data
    from segclip_d2.data.mapper import build_test_mapper
    from segclip_d2.engine import SegCLIPTrainer
    from segclip_d2.predict import SegInferencer

    monkeypatch.setattr(engine_data, "get_detection_dataset_dicts", lambda *a, **k: [{}])
    trainer = SegCLIPTrainer(cfg)
    trainer.checkpointer.resume_or_load = lambda path, resume=True: {}  # reads MODEL.WEIGHTS
    trainer.resume_or_load(resume=False)
    with warnings.catch_warnings():  # the recipe's worker count vs this machine's cores
        warnings.filterwarnings("ignore", "This DataLoader will create", UserWarning)
        trainer.build_train_loader(trainer.cfg)
    SegInferencer(cfg)  # evaluation and the demo run the model through it
    for name in cfg.DATASETS.TEST:
        build_test_mapper(cfg, name)
        SegCLIPTrainer.build_evaluator(cfg, name, str(output_dir / name))


# Keys read outside the objects built above, each with where it is read.
READ_ELSEWHERE = {
    "VERSION": "detectron2's merge_from_file, to upgrade old configs, before the build",
}


def _use_example_custom_dataset(cfg: CfgNode, root: Path, monkeypatch) -> None:
    """``DATASETS.CUSTOM example``: a 4-band dataset.yaml as datasets/prepare_custom.py writes."""
    from segclip_d2.data.custom import apply_custom_dataset

    record = {
        "name": "example",
        "classes": [{"name": n, "color": [i, i, i], "prompts": [n]} for i, n in enumerate("ab")],
        "bands": ["red", "green", "blue", "nir"],
        "pixel_mean": [100.0] * 4,
        "pixel_std": [50.0] * 4,
        "gsd_m": 0.5,
    }
    (root / "example").mkdir()
    (root / "example" / "dataset.yaml").write_text(yaml.safe_dump(record))
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    cfg.DATASETS.CUSTOM = "example"
    apply_custom_dataset(cfg)


@pytest.fixture(scope="module")
def keys_read(tmp_path_factory) -> dict[str, set[str]]:
    """Per YAML under configs/ (bases, Base-*.yaml, through the files that inherit them): the
    keys read while building everything from it."""
    monkeypatch = pytest.MonkeyPatch()
    reads = {}
    try:
        recorder = ConfigReads(monkeypatch)
        # open_clip models built on the CPU by earlier tests must not be reused on meta
        monkeypatch.setattr(weights, "_MODELS", {})
        for path in CONFIG_FILES:
            if path.name.startswith("Base-"):
                continue
            cfg = _load(path)
            out = tmp_path_factory.mktemp("cfg_reads")
            cfg.OUTPUT_DIR = str(out)
            cfg.MODEL.DEVICE = "meta"
            recorder.keys = set()
            cfg = recorder.tag(cfg)
            if path.parent.name == "custom":  # configs that need a prepared dataset's name
                _use_example_custom_dataset(cfg, out, monkeypatch)
            with torch.device("meta"):  # parameters without storage or initialisation
                _build_everything(cfg, out, monkeypatch)
            reads[path.relative_to(REPO).as_posix()] = recorder.keys
    finally:
        monkeypatch.undo()
    return reads


def test_config_reads_are_recorded(keys_read, monkeypatch):
    """The recorder sees attribute, item and get() reads, on clones too, and nothing else."""
    recorder = ConfigReads(monkeypatch)
    cfg = recorder.tag(_load(CONFIG_FILES[0]))
    clone = cfg.clone()
    assert clone.MODEL.SEGCLIP.TEXT["MODEL_NAME"] and clone.TEST.get("MODE")
    assert recorder.keys == {
        "MODEL",
        "MODEL.SEGCLIP",
        "MODEL.SEGCLIP.TEXT",
        "MODEL.SEGCLIP.TEXT.MODEL_NAME",
        "TEST",
        "TEST.MODE",
    }


def _keys_set_by(path: Path) -> set[str]:
    """Dotted keys a YAML file sets itself (not through its _BASE_)."""

    def walk(d, prefix=""):
        for key, value in d.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            elif key != "_BASE_":
                yield prefix + key

    return set(walk(yaml.safe_load(path.read_text()) or {}))


def test_every_key_a_yaml_sets_is_read(keys_read):
    """A YAML that sets a key nothing reads for it misleads its users (Mask2Former's configs
    carry several): each file's own keys must be read when building from it (a base's keys by
    some file that inherits it)."""
    read = set().union(*keys_read.values())
    problems = []
    for path in CONFIG_FILES:
        name = path.relative_to(REPO).as_posix()
        seen = keys_read.get(name, read) | set(READ_ELSEWHERE)
        problems += [f"{name}: {k}" for k in sorted(_keys_set_by(path) - seen)]
    assert not problems, "keys set in YAML but never read: " + ", ".join(problems)


def test_every_added_key_is_read_when_building(keys_read):
    """Every key add_segclip_config defines is read by the code that builds the model, trainer,
    mappers, evaluator and inferencer from some YAML under configs/: a key whose last read is
    deleted (or a new key nothing reads) fails here."""
    read = set().union(*keys_read.values())
    unread = [k for k in _added_keys() if k not in read]
    assert not unread, f"config keys defined in add_segclip_config but never read: {unread}"


def test_unknown_key_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  SEGCLIP:\n    NUM_QUERIS: 50\n")
    cfg = get_cfg()
    add_segclip_config(cfg)
    with pytest.raises(UserError, match="NUM_QUERIS"):
        load_config(str(bad), cfg=cfg)
    # Command-line overrides go through yacs, which asserts on unknown keys.
    with pytest.raises(AssertionError, match="Non-existent key: MODEL.SEGCLIP.TEXT.TEMPLATE"):
        cfg.merge_from_list(["MODEL.SEGCLIP.TEXT.TEMPLATE", "x"])


def test_config_saved_by_an_earlier_version_loads(tmp_path, caplog):
    """OUTPUT_DIR/config.yaml of a run before a key was removed still loads: the removed key is
    ignored with a warning naming it; an unknown key stays an error."""
    from segclip_d2.config import REMOVED_KEYS

    cfg = add_segclip_config(get_cfg())
    cfg.MODEL.SEGCLIP.SIZE_DIVISIBILITY = 64
    old = yaml.safe_load(cfg.dump())
    for key in REMOVED_KEYS:
        section, name = key.split(".")
        old[section][name] = -1
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(old))
    loaded = add_segclip_config(get_cfg())
    with caplog.at_level("WARNING"):
        load_config(str(saved), cfg=loaded)
    assert loaded.MODEL.SEGCLIP.SIZE_DIVISIBILITY == 64
    for key in REMOVED_KEYS:
        assert key in caplog.text
        assert loaded.key_is_deprecated(key)
    old["INPUT"]["SIZE_DIVISIBILTY"] = -1  # a typo is not a removed key
    saved.write_text(yaml.safe_dump(old))
    with pytest.raises(UserError, match="SIZE_DIVISIBILTY"):
        load_config(str(saved))
