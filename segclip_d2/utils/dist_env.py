"""Which launcher started this process: torchrun (env://), SLURM's srun, or none.

Training (train_net.py) and the demo share this, so both run unchanged under
``torchrun --nproc-per-node N`` and ``srun``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchEnv:
    source: str  # "torchrun" | "slurm" | "none"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str | None
    master_port: int | None


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: ``"gpu[03-05,7],cpu1"`` -> ``"gpu03"``."""
    nodelist = nodelist.strip()
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        raise ValueError(f"SLURM_JOB_NODELIST: cannot parse {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _int(env, key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ValueError(f"{key}={env[key]!r} is not an integer") from None


def detect_launch_env(environ=None) -> LaunchEnv:
    """Read the launcher's variables. torchrun wins over SLURM (torchrun inside an allocation)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env and "LOCAL_RANK" in env:
        world = _int(env, "WORLD_SIZE")
        return LaunchEnv(
            "torchrun",
            _int(env, "RANK"),
            world,
            _int(env, "LOCAL_RANK"),
            _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world,
            env.get("MASTER_ADDR"),
            _int(env, "MASTER_PORT") if "MASTER_PORT" in env else None,
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world = _int(env, "SLURM_NTASKS")
        if world > 1 or "SLURM_STEP_ID" in env:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
            local_world = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
            return LaunchEnv(
                "slurm",
                _int(env, "SLURM_PROCID"),
                world,
                _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
                int(local_world) if local_world.isdigit() else world,
                env.get("MASTER_ADDR") or (first_slurm_host(nodelist) if nodelist else None),
                _int(env, "MASTER_PORT") if "MASTER_PORT" in env else None,
            )
    return LaunchEnv("none", 0, 1, 0, 1, None, None)
