"""Many rasters across many processes: deterministic sharding of the inputs over the ranks of a
torchrun / srun launch (the ranks, threads and gather: :class:`segclip_d2.launch.Launch`), and
the run manifest.

Every rank predicts ``inputs[rank::world_size]`` (inputs in the order the command line expands
them, identical on every rank). At the end the ranks' records are gathered (gloo) and rank 0
writes ``run_manifest.json`` atomically: per input its outputs, status and seconds, plus the
model summary. A single process needs no process group.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from ..utils.atomic import atomic_output

logger = logging.getLogger(__name__)

MANIFEST = "run_manifest.json"


def shard(items: Sequence, rank: int, world_size: int) -> list:
    """The items of ``rank`` out of ``world_size``: every ``world_size``-th, from ``rank``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return list(items[rank::world_size])


def write_manifest(out_dir: str | Path, records: list[dict], summary: dict) -> Path:
    """``run_manifest.json`` in ``out_dir`` (temp file + rename)."""
    path = Path(out_dir) / MANIFEST
    body = {
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **summary,
        "inputs": records,
        "counts": {
            s: sum(1 for r in records if r["status"] == s) for s in ("done", "skipped", "failed")
        },
    }
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(body, indent=2, default=str) + "\n")
    return path
