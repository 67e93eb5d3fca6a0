"""Datasets: facts, registration, mappers and evaluation."""

from .._torchless import missing_torch_stack
from .dataset_facts import DATASETS, IGNORE_LABEL, DatasetFacts, get_facts

try:
    from . import mapper, register  # noqa: F401  (registers mappers and every split)
except ImportError as _e:  # torch-free install: the facts above are all there is
    if not missing_torch_stack(_e):
        raise

__all__ = ["DATASETS", "IGNORE_LABEL", "DatasetFacts", "get_facts"]
