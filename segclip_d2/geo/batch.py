"""Many rasters across many processes: deterministic sharding of the inputs over the ranks of a
torchrun / srun launch, per-rank CPU threads, and the run manifest.

Every rank predicts ``inputs[rank::world_size]`` (inputs in the order the command line expands
them, identical on every rank). At the end the ranks' records are gathered (gloo) and rank 0
writes ``run_manifest.json`` atomically: per input its outputs, status and seconds, plus the
model summary. A single process needs no process group.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ..utils.atomic import atomic_output
from ..utils.dist_env import LaunchEnv, detect_launch_env

logger = logging.getLogger(__name__)

MANIFEST = "run_manifest.json"
# How long ranks wait for each other at the final gather (slow shards of a big archive).
GATHER_TIMEOUT = datetime.timedelta(days=2)


def shard(items: Sequence, rank: int, world_size: int) -> list:
    """The items of ``rank`` out of ``world_size``: every ``world_size``-th, from ``rank``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return list(items[rank::world_size])


class Launch:
    """The launch environment of this process, with the process group when ``world_size > 1``."""

    def __init__(self, env: LaunchEnv | None = None):
        self.env = env or detect_launch_env()
        self._pg = False

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    def setup(self, device: str) -> str:
        """Threads (CPU: cores / local processes) and device (GPU: the local rank's); returns the
        device to use."""
        import torch

        if self.world_size == 1:
            return device
        if device.startswith("cuda") and torch.cuda.is_available():
            device = f"cuda:{self.env.local_rank % torch.cuda.device_count()}"
            torch.cuda.set_device(device)
        else:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
            cores = cores or os.cpu_count() or 1
            torch.set_num_threads(max(1, cores // max(1, self.env.local_world_size)))
        logger.info(
            "rank %d of %d (%s): device %s, %d thread(s)",
            self.rank,
            self.world_size,
            self.env.source,
            device,
            torch.get_num_threads(),
        )
        return device

    def _init_group(self) -> None:
        import torch.distributed as dist

        if self._pg or dist.is_initialized():
            return
        os.environ.setdefault("MASTER_ADDR", self.env.master_addr or "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(self.env.master_port or 29500))
        dist.init_process_group(
            "gloo",
            init_method="env://",
            rank=self.rank,
            world_size=self.world_size,
            timeout=GATHER_TIMEOUT,
        )
        self._pg = True

    def gather(self, records: list[dict]) -> list[dict] | None:
        """All ranks' records on rank 0 (in input order), ``None`` on the others."""
        if self.world_size == 1:
            return records
        import torch.distributed as dist

        self._init_group()
        out = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(records, out, dst=0)
        if self.rank != 0:
            return None
        merged = [r for part in out for r in part]
        return sorted(merged, key=lambda r: r["index"])

    def close(self) -> None:
        if self._pg:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._pg = False


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
