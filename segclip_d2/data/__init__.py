"""Datasets: facts, registration, mappers and evaluation."""

from . import mapper, register  # noqa: F401  (registers mappers and every split)
from .dataset_facts import DATASETS, IGNORE_LABEL, DatasetFacts, get_facts

__all__ = ["DATASETS", "IGNORE_LABEL", "DatasetFacts", "get_facts"]
