"""The one launcher of every entry point: which launcher started this process, and starting or
joining the processes of a run.

Three ways in, one code path:

- **torchrun** (``torchrun --nproc-per-node N ...``) or **SLURM** (``srun``): the launcher already
  started every process. :func:`detect_launch_env` reads its variables (``RANK``/``WORLD_SIZE``/
  ``LOCAL_RANK`` with env:// rendezvous, or ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``
  with the first host of the node list).
- ``train_net.py --num-gpus N`` with enough GPUs: detectron2's ``launch`` (one GPU per process).
- ``train_net.py --num-gpus N`` without CUDA (detectron2's launcher asserts CUDA): N CPU processes.

Training calls :func:`launch` (it joins the process group and runs the training function; NCCL on
GPUs, gloo on CPU, ``cores / processes per machine`` threads per CPU process). Prediction over
many rasters (demo/demo.py) uses :class:`Launch`: the rank and world size to shard the inputs,
per-rank device and threads, and a gloo group only for the final gather.

Importing this module needs no torch (the torch-free ``demo.py --onnx`` path reads the launch
environment); torch and detectron2 are imported where they are used.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
import sys
from dataclasses import dataclass

from .errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)
# How long prediction ranks wait for each other at the final gather (slow shards of an archive).
GATHER_TIMEOUT = datetime.timedelta(days=2)


# --------------------------------------------------------------------------- the environment
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


def _slurm_env(env) -> LaunchEnv:
    world = _int(env, "SLURM_NTASKS")
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
        if _int(env, "SLURM_NTASKS") > 1 or "SLURM_STEP_ID" in env:
            return _slurm_env(env)
    return LaunchEnv("none", 0, 1, 0, 1, None, None)


def slurm_default_port(job_id: int) -> int:
    """MASTER_PORT for a SLURM job that does not set one: 15000-34999, from the job id."""
    return 15000 + job_id % 20000


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def default_backend() -> str:
    """NCCL with CUDA, gloo on CPU."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def set_cpu_threads(processes_per_machine: int) -> int:
    """torch threads of one of ``processes_per_machine`` CPU processes: its share of the cores
    this process may use. Returns the number set."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    threads = max(1, (cores or os.cpu_count() or 1) // max(1, processes_per_machine))
    torch.set_num_threads(threads)
    return threads


# --------------------------------------------------------------------------- training
def launch(
    main_func,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str | None = None,
    args: tuple = (),
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
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
    import torch

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
    import torch.multiprocessing as mp

    logger.info(f"No (or too few) GPUs: starting {num_gpus_per_machine} CPU processes (gloo)")
    mp.spawn(
        _cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
    )
    return None


def _join(backend, init_method, world_size, rank, local_world_size, timeout) -> None:
    """Join the process group and detectron2's per-machine group; CPU threads for gloo."""
    import torch.distributed as dist
    from detectron2.utils import comm

    from . import compat

    dist.init_process_group(
        backend=backend, init_method=init_method, world_size=world_size, rank=rank, timeout=timeout
    )
    compat.create_local_process_group(local_world_size)
    if backend == "gloo":
        set_cpu_threads(local_world_size)
    comm.synchronize()


def _cpu_worker(
    local_rank, main_func, world_size, num_per_machine, machine_rank, dist_url, args, timeout
):
    import torch.distributed as dist

    rank = machine_rank * num_per_machine + local_rank
    _join("gloo", dist_url, world_size, rank, num_per_machine, timeout)
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()


def _master_port(env: LaunchEnv) -> int:
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
    return port


def _run_launched(main_func, env: LaunchEnv, num_gpus, num_machines, args, timeout):
    """This process is rank ``env.rank`` of a job torchrun or srun started."""
    if num_gpus != 1 or num_machines != 1:
        logger.warning(
            f"started by {env.source} ({env.world_size} processes): --num-gpus {num_gpus} / "
            f"--num-machines {num_machines} are ignored (the launcher decides)"
        )
    port = _master_port(env)
    import torch
    import torch.distributed as dist

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
    init = f"tcp://{env.master_addr}:{port}"
    _join(backend, init, env.world_size, env.rank, env.local_world_size, timeout)
    try:
        return main_func(*args)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- prediction
class Launch:
    """The launch environment of a prediction process (one per rank, started by torchrun or
    srun), with a gloo process group for the final gather when ``world_size > 1``."""

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
            set_cpu_threads(self.env.local_world_size)
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
