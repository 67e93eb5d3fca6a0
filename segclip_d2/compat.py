"""Every difference between detectron2 0.5 (the PyPI fallback) and current detectron2 that this
project depends on, in one place.

- ``launch()``: 0.5 asserts CUDA and always uses NCCL; current detectron2 still assumes GPUs.
  :mod:`segclip_d2.launch` launches CPU processes itself and calls
  :func:`create_local_process_group` here.
- the local (per-machine) process group: 0.5 stores it in ``comm._LOCAL_PROCESS_GROUP``;
  current detectron2 builds it with ``comm.create_local_process_group(n)``.
- ``create_ddp_model``: 0.5 always passes ``device_ids=[local_rank]``, which DDP rejects for a
  CPU model; :func:`create_ddp_model` passes ``device_ids=None`` on CPU.
- ``AMPTrainer``: 0.5 asserts CUDA; the project's train loop
  (:class:`segclip_d2.engine.train_loop.SegCLIPTrainLoop`) does AMP itself (bf16 on CPU).
- ``hooks.BestCheckpointer`` does not exist in 0.5; the project has its own
  (:class:`segclip_d2.engine.hooks.BestCheckpointer`).
- ``SimpleTrainer`` creates its data-loader iterator eagerly in 0.5 and lazily today; the
  trainer's loader builds its workers on the first ``next()`` (see
  :class:`segclip_d2.engine.data.ResumableTrainLoader`), so it can start where a resumed run
  left off with either version.
- ``DefaultTrainer.state_dict`` leaves out the optimizer in 0.5 (resuming restarted AdamW's
  moments); :class:`segclip_d2.engine.trainer.SegCLIPTrainer` saves the inner loop's state
  (optimizer, grad scaler) itself, under the key current detectron2 uses (``_trainer``).
"""

from __future__ import annotations

import logging

import detectron2
import torch
import torch.distributed as dist
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)

D2_VERSION = tuple(int(p) for p in detectron2.__version__.split(".")[:2] if p.isdigit())


def create_local_process_group(num_workers_per_machine: int) -> None:
    """Create detectron2's per-machine process group (call after ``init_process_group``)."""
    if hasattr(comm, "create_local_process_group"):  # detectron2 >= 0.6
        comm.create_local_process_group(num_workers_per_machine)
        return
    if comm._LOCAL_PROCESS_GROUP is not None:  # 0.5
        raise RuntimeError("the local process group already exists")
    world_size = dist.get_world_size()
    if world_size % num_workers_per_machine:
        raise ValueError(f"world size {world_size} is not a multiple of {num_workers_per_machine}")
    machine_rank = dist.get_rank() // num_workers_per_machine
    for i in range(world_size // num_workers_per_machine):
        ranks = list(range(i * num_workers_per_machine, (i + 1) * num_workers_per_machine))
        group = dist.new_group(ranks)  # every process must create every group
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group


def create_ddp_model(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """DistributedDataParallel when there is more than one process; CPU models get
    ``device_ids=None`` (detectron2 0.5 would pass the local rank as a CUDA device)."""
    if comm.get_world_size() == 1:
        return model
    device = next(model.parameters()).device
    if "device_ids" not in kwargs:
        kwargs["device_ids"] = [comm.get_local_rank()] if device.type == "cuda" else None
    return DistributedDataParallel(model, **kwargs)


def _collect_env_info_safe() -> str:
    from detectron2.utils.collect_env import collect_env_info

    try:
        return collect_env_info()
    except (ImportError, AttributeError, OSError, RuntimeError) as e:
        # The pure-Python detectron2 fallback has no compiled _C to ask for its compiler.
        return (
            f"detectron2 {detectron2.__version__} (environment report unavailable: {e})\n"
            f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}"
        )


def default_setup(cfg, args) -> None:
    """detectron2's ``default_setup`` (logger, config dump, seeding), tolerating a detectron2
    without compiled ops, whose ``collect_env_info`` raises."""
    from detectron2.engine import defaults

    original = defaults.collect_env_info
    defaults.collect_env_info = _collect_env_info_safe
    try:
        defaults.default_setup(cfg, args)
    finally:
        defaults.collect_env_info = original
