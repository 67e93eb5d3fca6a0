"""Start N training processes on one or more machines, with or without GPUs.

With enough GPUs this defers to detectron2's ``launch`` (NCCL, one GPU per process). On a
machine without CUDA (detectron2's launcher asserts CUDA) it spawns N CPU processes joined by a
gloo process group, each with ``cores / N`` torch threads.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.utils import comm

from .. import compat

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=30)


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(
    main_func,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str | None = None,
    args: tuple = (),
    timeout: timedelta = DEFAULT_TIMEOUT,
):
    """Run ``main_func(*args)`` in ``num_gpus_per_machine`` processes per machine.

    ``num_gpus_per_machine`` is the number of processes; on CPU-only machines they are CPU
    processes. Returns ``main_func``'s result when a single process runs it in-process.
    """
    if num_gpus_per_machine < 1 or num_machines < 1:
        raise ValueError("--num-gpus and --num-machines must be >= 1")
    world_size = num_machines * num_gpus_per_machine
    if world_size == 1:
        return main_func(*args)
    if dist_url is None or dist_url == "auto":
        if num_machines != 1:
            raise ValueError("dist_url 'auto' only works on one machine; pass --dist-url")
        dist_url = f"tcp://127.0.0.1:{find_free_port()}"
    if torch.cuda.is_available() and torch.cuda.device_count() >= num_gpus_per_machine:
        from detectron2.engine import launch as d2_launch

        return d2_launch(
            main_func,
            num_gpus_per_machine,
            num_machines=num_machines,
            machine_rank=machine_rank,
            dist_url=dist_url,
            args=args,
            timeout=timeout,
        )
    logger.info(f"No (or too few) GPUs: starting {num_gpus_per_machine} CPU processes (gloo)")
    mp.spawn(
        _cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
    )
    return None


def _cpu_worker(
    local_rank, main_func, world_size, num_per_machine, machine_rank, dist_url, args, timeout
):
    rank = machine_rank * num_per_machine + local_rank
    dist.init_process_group(
        backend="gloo", init_method=dist_url, world_size=world_size, rank=rank, timeout=timeout
    )
    compat.create_local_process_group(num_per_machine)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (cores or 1) // num_per_machine))
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()
