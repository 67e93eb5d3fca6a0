"""Start N training processes on one or more machines, with or without GPUs.

Three ways in, one code path for the training function:

- **torchrun** (``torchrun --nproc-per-node N train_net.py ...``) or **SLURM** (``srun``): the
  launcher already started every process. :func:`launch` reads its variables
  (:func:`segclip_d2.utils.dist_env.detect_launch_env`: ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``
  with env:// rendezvous, or ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` with the first
  host of the node list), joins the process group and runs the function in this process.
- ``--num-gpus N`` with enough GPUs: detectron2's ``launch`` (one GPU per process).
- ``--num-gpus N`` without CUDA (detectron2's launcher asserts CUDA): N CPU processes.

NCCL is used on GPUs, gloo on CPU; CPU processes get ``cores / processes per machine`` threads.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.utils import comm

from .. import compat
from ..errors import UserError
from ..utils.dist_env import LaunchEnv, detect_launch_env

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
    processes. Under torchrun or srun the launcher's processes are used instead (see module
    doc). Returns ``main_func``'s result when it runs in this process.
    """
    if num_gpus_per_machine < 1 or num_machines < 1:
        raise ValueError("--num-gpus and --num-machines must be >= 1")
    env = detect_launch_env()
    if env.source != "none":
        return _run_launched(main_func, env, num_gpus_per_machine, num_machines, args, timeout)
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
    _set_cpu_threads(num_per_machine)
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()


def default_backend() -> str:
    """NCCL with CUDA, gloo on CPU."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def _set_cpu_threads(num_per_machine: int) -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (cores or 1) // num_per_machine))


def slurm_default_port(job_id: int) -> int:
    """MASTER_PORT for a SLURM job that does not set one: 15000-34999, from the job id."""
    return 15000 + job_id % 20000


def _run_launched(main_func, env: LaunchEnv, num_gpus, num_machines, args, timeout):
    """This process is rank ``env.rank`` of a job torchrun or srun started."""
    if num_gpus != 1 or num_machines != 1:
        logger.warning(
            f"started by {env.source} ({env.world_size} processes): --num-gpus {num_gpus} / "
            f"--num-machines {num_machines} are ignored (the launcher decides)"
        )
    port = env.master_port
    if port is None and env.source == "slurm" and os.environ.get("SLURM_JOB_ID", "").isdigit():
        port = slurm_default_port(int(os.environ["SLURM_JOB_ID"]))  # same on every task
    if env.master_addr is None or port is None:
        missing = "MASTER_ADDR" if env.master_addr is None else "MASTER_PORT"
        raise UserError(
            missing,
            f"not set, and {env.source} started {env.world_size} processes",
            "export MASTER_ADDR (the first node) and MASTER_PORT (a free port), as "
            "tools/slurm/train.sbatch does",
        )
    backend = default_backend()
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank % max(torch.cuda.device_count(), 1))
    # printed: the loggers are set up later, by the training function
    print(
        f"{env.source}: rank {env.rank} of {env.world_size} (local {env.local_rank} of "
        f"{env.local_world_size}), {backend} via {env.master_addr}:{port}",
        file=sys.stderr,
        flush=True,
    )
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{env.master_addr}:{port}",
        world_size=env.world_size,
        rank=env.rank,
        timeout=timeout,
    )
    compat.create_local_process_group(env.local_world_size)
    if backend == "gloo":
        _set_cpu_threads(env.local_world_size)
    comm.synchronize()
    try:
        return main_func(*args)
    finally:
        dist.destroy_process_group()
