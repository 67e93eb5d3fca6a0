"""The one place that holds every fact about the datasets this project knows.

Class names, prompt-ready names, colours, the ignore value and the raw-label -> train-id mapping of
LoveDA, iSAID, UAVid and the built-in synthetic aerial set live here. Registration, the
preparation scripts, the mapper, the evaluator and the demo read them from here and nowhere else.

Train ids are ``0..K-1``; ``IGNORE_LABEL`` (255) marks pixels that are scored by nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IGNORE_LABEL = 255


def prompt_name(name: str) -> str:
    """Turn a dataset class name into the words used in a text prompt.

    >>> prompt_name("small_vehicle")
    'small vehicle'
    """
    return " ".join(name.replace("_", " ").replace("-", " ").split())


@dataclass(frozen=True)
class DatasetFacts:
    """Facts about one dataset's label encoding and classes.

    ``raw_encoding`` is ``"index"`` (single-channel labels; ``raw_to_train`` maps raw values to
    train ids, values mapped to ``IGNORE_LABEL`` are ignored) or ``"rgb"`` (colour labels;
    ``colors`` doubles as the exact palette, colour ``i`` is train id ``i``).
    """

    key: str
    title: str
    classes: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    raw_encoding: str
    raw_to_train: dict[int, int] = field(default_factory=dict)
    ignore_label: int = IGNORE_LABEL
    evaluator_type: str = "sem_seg"
    prepare_command: str = ""

    def __post_init__(self):
        if len(self.classes) != len(self.colors):
            raise ValueError(
                f"{self.key}: {len(self.classes)} classes but {len(self.colors)} colours"
            )
        if self.raw_encoding not in ("index", "rgb"):
            raise ValueError(f"{self.key}: unknown raw encoding {self.raw_encoding!r}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def prompt_names(self) -> tuple[str, ...]:
        return tuple(prompt_name(c) for c in self.classes)

    # ------------------------------------------------------------------ raw label conversion
    def index_lut(self) -> np.ndarray:
        """A 256-entry lookup table raw value -> train id; unknown raw values map to -1."""
        lut = np.full(256, -1, dtype=np.int16)
        for raw, train in self.raw_to_train.items():
            lut[raw] = train
        return lut

    def raw_to_train_ids(self, raw: np.ndarray, source: str = "<array>") -> np.ndarray:
        """Convert a raw label array (H, W) or (H, W, 3) to train ids (H, W) uint8.

        Raises ``ValueError`` naming ``source``, the offending values or colours and their pixel
        counts when the array holds anything outside this dataset's encoding.
        """
        if self.raw_encoding == "index":
            if raw.ndim != 2:
                raise ValueError(
                    f"{source}: {self.title} labels are single-channel, got an array of shape "
                    f"{tuple(raw.shape)}"
                )
            if raw.dtype != np.uint8:
                if raw.size and (raw.min() < 0 or raw.max() > 255):
                    raise ValueError(
                        f"{source}: label values {int(raw.min())}..{int(raw.max())} do not fit "
                        f"the {self.title} encoding {sorted(self.raw_to_train)}"
                    )
                raw = raw.astype(np.uint8)
            out = self.index_lut()[raw]
            bad = out < 0
            if bad.any():
                vals, counts = np.unique(raw[bad], return_counts=True)
                detail = ", ".join(f"{v} ({c} px)" for v, c in zip(vals.tolist(), counts.tolist()))
                raise ValueError(
                    f"{source}: label values outside the {self.title} encoding "
                    f"{sorted(self.raw_to_train)}: {detail}"
                )
            return out.astype(np.uint8)
        # rgb
        if raw.ndim != 3 or raw.shape[2] < 3:
            raise ValueError(
                f"{source}: {self.title} labels are RGB colour images, got an array of shape "
                f"{tuple(raw.shape)}"
            )
        rgb = raw[..., :3].astype(np.uint32)
        code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        palette = np.array([(r << 16) | (g << 8) | b for r, g, b in self.colors], dtype=np.uint32)
        order = np.argsort(palette)
        sorted_pal = palette[order]
        pos = np.clip(np.searchsorted(sorted_pal, code), 0, len(sorted_pal) - 1)
        hit = sorted_pal[pos] == code
        if not hit.all():
            codes, counts = np.unique(code[~hit], return_counts=True)
            detail = ", ".join(
                f"RGB({c >> 16},{(c >> 8) & 255},{c & 255}) ({n} px)"
                for c, n in zip(codes.tolist()[:10], counts.tolist()[:10])
            )
            more = f" and {len(codes) - 10} more colours" if len(codes) > 10 else ""
            raise ValueError(
                f"{source}: {int((~hit).sum())} pixels have colours outside the {self.title} "
                f"palette: {detail}{more}"
            )
        return order[pos].astype(np.uint8)

    def colorize(self, train_ids: np.ndarray, ignore_color=(0, 0, 0)) -> np.ndarray:
        """Train ids (H, W) -> RGB image (H, W, 3) uint8 in this dataset's palette."""
        lut = np.zeros((256, 3), dtype=np.uint8)
        lut[:] = ignore_color
        lut[: self.num_classes] = np.array(self.colors, dtype=np.uint8)
        return lut[train_ids.astype(np.uint8)]


LOVEDA_CLASSES = ("background", "building", "road", "water", "barren", "forest", "agriculture")
# The LoveDA authors' colour map.
LOVEDA_COLORS = (
    (255, 255, 255),
    (255, 0, 0),
    (255, 255, 0),
    (0, 0, 255),
    (159, 129, 183),
    (0, 255, 0),
    (255, 195, 128),
)

LOVEDA = DatasetFacts(
    key="loveda",
    title="LoveDA",
    classes=LOVEDA_CLASSES,
    colors=LOVEDA_COLORS,
    raw_encoding="index",
    # 0 is no-data; 1..7 are the classes.
    raw_to_train={0: IGNORE_LABEL, **{i + 1: i for i in range(7)}},
    prepare_command=(
        "python datasets/prepare_loveda.py --src RAW_LOVEDA_DIR --dst $DETECTRON2_DATASETS"
    ),
)

ISAID = DatasetFacts(
    key="isaid",
    title="iSAID",
    classes=(
        "background",
        "ship",
        "storage_tank",
        "baseball_diamond",
        "tennis_court",
        "basketball_court",
        "ground_track_field",
        "bridge",
        "large_vehicle",
        "small_vehicle",
        "helicopter",
        "swimming_pool",
        "roundabout",
        "soccer_ball_field",
        "plane",
        "harbor",
    ),
    # The official iSAID semantic palette; colour i is train id i (exact match).
    colors=(
        (0, 0, 0),
        (0, 0, 63),
        (0, 63, 63),
        (0, 63, 0),
        (0, 63, 127),
        (0, 63, 191),
        (0, 63, 255),
        (0, 127, 63),
        (0, 127, 127),
        (0, 0, 127),
        (0, 0, 191),
        (0, 0, 255),
        (0, 191, 127),
        (0, 127, 191),
        (0, 127, 255),
        (0, 100, 155),
    ),
    raw_encoding="rgb",
    prepare_command=(
        "python datasets/prepare_isaid.py --src RAW_ISAID_DIR --dst $DETECTRON2_DATASETS"
    ),
)

UAVID = DatasetFacts(
    key="uavid",
    title="UAVid",
    classes=(
        "clutter",
        "building",
        "road",
        "tree",
        "low_vegetation",
        "moving_car",
        "static_car",
        "human",
    ),
    colors=(
        (0, 0, 0),
        (128, 0, 0),
        (128, 64, 128),
        (0, 128, 0),
        (128, 128, 0),
        (64, 0, 128),
        (192, 0, 192),
        (64, 64, 0),
    ),
    raw_encoding="rgb",
    prepare_command=(
        "python datasets/prepare_uavid.py --src RAW_UAVID_DIR --dst $DETECTRON2_DATASETS"
    ),
)

# The built-in synthetic aerial set uses LoveDA's classes, colours and raw encoding.
SYNTHETIC = DatasetFacts(
    key="synthetic_aerial",
    title="synthetic aerial",
    classes=LOVEDA_CLASSES,
    colors=LOVEDA_COLORS,
    raw_encoding="index",
    raw_to_train=dict(LOVEDA.raw_to_train),
    prepare_command="python datasets/prepare_synthetic.py --dst $DETECTRON2_DATASETS",
)

DATASETS: dict[str, DatasetFacts] = {f.key: f for f in (LOVEDA, ISAID, UAVID, SYNTHETIC)}
BUILTIN_KEYS = frozenset(DATASETS)


def get_facts(key: str) -> DatasetFacts:
    """Facts of a dataset by key (``loveda``, ``isaid``, ``uavid``, ``synthetic_aerial``)."""
    try:
        return DATASETS[key]
    except KeyError:
        raise KeyError(f"unknown dataset {key!r}; known: {sorted(DATASETS)}") from None


def add_facts(facts: DatasetFacts) -> None:
    """Add (or replace) the facts of a dataset prepared by ``datasets/prepare_custom.py``; the
    built-in datasets cannot be replaced."""
    if facts.key in BUILTIN_KEYS:
        raise ValueError(f"{facts.key!r} is a built-in dataset; choose another name")
    DATASETS[facts.key] = facts
