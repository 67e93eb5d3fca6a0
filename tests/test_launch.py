"""The launcher's choice between torchrun, SLURM and --num-gpus (the multi-process runs are in
test_train_distributed.py)."""

import os

import pytest

from segclip_d2 import launch as launch_mod
from segclip_d2.errors import UserError
from segclip_d2.launch import detect_launch_env, first_slurm_host


def _never(*args):
    raise AssertionError("the training function must not run")


def test_torchrun_without_master_addr_is_a_user_error(monkeypatch):
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(UserError, match="MASTER_ADDR"):
        launch_mod.launch(_never, 1)


def test_slurm_port_comes_from_the_job_id_on_every_task(monkeypatch):
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NTASKS_PER_NODE": "4(x2)"}  # fmt: skip
    found = detect_launch_env(env)
    assert (found.source, found.rank, found.world_size, found.local_world_size) == (
        "slurm", 1, 8, 4)  # fmt: skip
    assert found.master_addr == first_slurm_host("gpu[07-08]") == "gpu07"
    assert launch_mod.slurm_default_port(123456) == launch_mod.slurm_default_port(123456)
    assert 15000 <= launch_mod.slurm_default_port(987654321) < 35000


def test_plain_run_is_in_process(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    assert launch_mod.launch(lambda x: x * 2, 1, args=(21,)) == 42
    assert launch_mod.default_backend() in ("gloo", "nccl")


def test_the_launcher_imports_without_torch():
    """demo.py --onnx runs without torch and reads the launch environment through this module."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'detectron2', 'fvcore'):\n"
        "            raise ModuleNotFoundError(f'No module named {name}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from segclip_d2.launch import Launch\n"
        "from segclip_d2.geo.batch import shard\n"
        "assert Launch().world_size == 1 and 'torch' not in sys.modules\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "SLURM_PROCID")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
