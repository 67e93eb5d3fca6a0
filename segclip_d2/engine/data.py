"""The training data loader: an infinite, seeded, resumable stream of mapped batches.

Global stream: epoch after epoch, a permutation of the dataset drawn from the shuffle seed.
Process ``r`` of ``P`` takes positions ``r, r+P, r+2P, ...`` so a global batch of B images is the
same set of images whatever the number of processes. With ``cfg.SEED >= 0`` every image is
mapped (augmented) with the RNGs seeded from its stream position, so a batch's content does not
depend on the number of processes, data workers, or whether the run was resumed; resuming at
iteration ``i`` starts the stream at position ``i * IMS_PER_BATCH``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator

import numpy as np
import torch
from detectron2.data import get_detection_dataset_dicts
from detectron2.data.build import worker_init_reset_seed
from detectron2.utils import comm
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from ..errors import UserError

logger = logging.getLogger(__name__)

# A sample the mapper could not read travels to the main process as this key (an exception
# raised in a data worker would arrive wrapped, with the worker's traceback in its message).
BAD_SAMPLE = "_unreadable"
BAD_DATA_FIX = (
    "replace or re-prepare that file (datasets/prepare_*.py), then continue with --resume; the "
    "checkpoints written before are intact"
)


def position_seed(seed: int, position: int) -> int:
    """A 31-bit seed for stream position ``position`` of a run seeded with ``seed``."""
    return (seed * 1_000_003 + position * 7_919 + 17) % (2**31 - 1)


def seed_all(seed: int) -> None:
    """Seed python's, numpy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class PositionedTrainingSampler(Sampler):
    """Infinite stream of ``(position, dataset index)`` for this process (see module doc)."""

    def __init__(
        self, size: int, seed: int, start: int = 0, shuffle: bool = True, rank=None, world=None
    ):
        if size <= 0:
            raise ValueError("the training set is empty")
        self.size = size
        self.seed = int(seed)
        self.start = int(start)
        self.shuffle = shuffle
        self.rank = comm.get_rank() if rank is None else rank
        self.world = comm.get_world_size() if world is None else world

    def _epoch(self, g: torch.Generator) -> list[int]:
        if self.shuffle:
            return torch.randperm(self.size, generator=g).tolist()
        return list(range(self.size))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator()
        g.manual_seed(self.seed)
        epoch_start = 0
        while True:
            order = self._epoch(g)  # drawn for skipped epochs too: the stream stays the same
            end = epoch_start + self.size
            if end > self.start:
                first = max(self.start, epoch_start)
                offset = (self.rank - (first - self.start)) % self.world
                for pos in range(first + offset, end, self.world):
                    yield pos, order[pos - epoch_start]
            epoch_start = end


class PositionSeededDataset(Dataset):
    """Maps ``dataset_dicts[index]`` with ``mapper``; keyed by ``(position, index)``."""

    def __init__(self, dataset_dicts: list[dict], mapper: Callable, seed: int | None):
        self.dataset_dicts = dataset_dicts
        self.mapper = mapper
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset_dicts)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        position, index = key
        if self.seed is not None:
            seed_all(position_seed(self.seed, position))
        record = self.dataset_dicts[index]
        try:
            out = self.mapper(record)
        except (ValueError, OSError) as e:  # a corrupt, truncated or mismatching file
            text = " ".join(str(e).split())
            if record.get("file_name", "") not in text:
                text = f"{record.get('file_name')}: {text}"
            return {BAD_SAMPLE: text}
        if out is None:
            raise ValueError(f"{record.get('file_name')}: the dataset mapper returned None")
        return out


def _list_collate(batch: list[dict]) -> list[dict]:
    return batch


def build_train_loader(cfg, mapper: Callable, start_iter: int = 0) -> DataLoader:
    """Batches (lists of mapped dicts) of ``IMS_PER_BATCH / world size`` images."""
    world = comm.get_world_size()
    total = cfg.SOLVER.IMS_PER_BATCH
    if total <= 0 or total % world:
        raise ValueError(f"SOLVER.IMS_PER_BATCH={total} must be a positive multiple of {world}")
    dicts = get_detection_dataset_dicts(list(cfg.DATASETS.TRAIN), filter_empty=False)
    seed = cfg.SEED if cfg.SEED >= 0 else None
    shuffle_seed = seed if seed is not None else comm.shared_random_seed()
    sampler = PositionedTrainingSampler(len(dicts), shuffle_seed, start=start_iter * total)
    dataset = PositionSeededDataset(dicts, mapper, seed)
    return DataLoader(
        dataset,
        batch_sampler=BatchSampler(sampler, total // world, drop_last=True),
        collate_fn=_list_collate,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        worker_init_fn=None if seed is not None else worker_init_reset_seed,
    )


class ResumableTrainLoader:
    """An iterable of training batches whose real loader is built on the first ``next()``.

    Set ``start_iter`` after resuming and before the first step; ``iter()`` alone does not build
    anything (detectron2 0.5's ``SimpleTrainer`` calls it in its constructor).
    """

    def __init__(self, build_fn: Callable[[int], DataLoader]):
        self._build_fn = build_fn
        self.start_iter = 0

    def __iter__(self):
        return self._generate()

    def _generate(self):
        logger.info(f"Building the training data loader (starting at iteration {self.start_iter})")
        for batch in self._build_fn(self.start_iter):
            for sample in batch:
                if BAD_SAMPLE in sample:
                    raise UserError("training data", sample[BAD_SAMPLE], BAD_DATA_FIX)
            yield batch


def check_labels_not_all_ignored(name: str, key: str) -> None:
    """Some label of dataset ``name`` holds a class: labels that are all the ignore value train
    nothing. Reads labels until one holds a class (usually the first)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from ..data.dataset_facts import IGNORE_LABEL
    from ..data.mapper import read_class_png

    ignore = MetadataCatalog.get(name).get("ignore_label", IGNORE_LABEL)
    records = [r for r in DatasetCatalog.get(name) if "sem_seg_file_name" in r]
    if not records:
        raise UserError(key, f"dataset {name!r} has no labels to train on", BAD_DATA_FIX)
    for r in records:
        try:
            label = read_class_png(r["sem_seg_file_name"], "label")
        except ValueError as e:
            raise UserError(key, " ".join(str(e).split()), BAD_DATA_FIX) from None
        if (label != ignore).any():
            return
    raise UserError(
        key,
        f"dataset {name!r}: all {len(records)} labels hold only the ignore value {ignore} "
        f"(e.g. {records[0]['sem_seg_file_name']}), nothing to learn",
        "prepare the labels again (datasets/prepare_*.py maps the raw classes to train ids)",
    )
