"""``train_net.py --num-gpus 2`` on CPU: two gloo processes train like one process on the same
global batch (the criterion normalises over all processes; DDP averages the gradients)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng
from test_train import REPO, TINY_OPTS, tiny_cfg  # tests/ is on sys.path (rootdir import mode)

# SGD, so the weight change after one step is -lr x gradient. FrozenBN: batch statistics
# would differ between 1 image per process and 2 images in one process (use SyncBN on GPUs).
# Many points per mask: the random point sampling differs between the runs.
OPTS = TINY_OPTS + [
    *("SOLVER.OPTIMIZER", "SGD", "SOLVER.MOMENTUM", "0.0", "SOLVER.BASE_LR", "0.5"),
    *("SOLVER.MAX_ITER", "1", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WEIGHT_DECAY", "0.0"),
    *("SOLVER.CLIP_GRADIENTS.ENABLED", "False", "MODEL.RESNETS.NORM", "FrozenBN"),
    *("MODEL.SEGCLIP.LOSS.TRAIN_NUM_POINTS", "12544", "INPUT.RANDOM_VFLIP", "False"),
    *("INPUT.RANDOM_ROTATE90", "False"),
]


def _run(num_procs, out_dir, env):
    cmd = [
        sys.executable,
        str(REPO / "train_net.py"),
        "--config-file",
        str(REPO / "configs" / "synthetic" / "segclip_cpu.yaml"),
        "--num-gpus",
        str(num_procs),
        *OPTS,
        "OUTPUT_DIR",
        str(out_dir),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = (out_dir / "metrics.json").read_text().splitlines()
    metrics = [json.loads(x) for x in lines if '"total_loss"' in x]
    weights = torch.load(out_dir / "model_final.pth", map_location="cpu", weights_only=False)
    return metrics[0], weights["model"], proc.stdout + proc.stderr


@pytest.mark.slow
def test_two_cpu_processes_match_one(tmp_path):
    root = tmp_path / "datasets"
    env = dict(
        os.environ,
        DETECTRON2_DATASETS=str(root),
        SEGCLIP_SYNTHETIC_NUM_TRAIN="4",
        SEGCLIP_SYNTHETIC_NUM_VAL="2",
        SEGCLIP_SYNTHETIC_SIZE="64",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(REPO),
    )
    one, w_one, _ = _run(1, tmp_path / "one", env)
    two, w_two, log = _run(2, tmp_path / "two", env)
    assert "World size: 2" in log

    # detectron2 logs the mean of the processes' losses: equal to the one-process loss up to
    # the random point sampling.
    assert two["total_loss"] == pytest.approx(one["total_loss"], rel=0.03)

    # Same initial weights (rank 0 seeds and DDP broadcasts) -> compare the SGD updates.
    cfg = tiny_cfg(tmp_path / "init", *OPTS)
    seed_all_rng(cfg.SEED)
    init = build_model(cfg).state_dict()
    d_one, d_two = [], []
    for k, v in init.items():
        if v.is_floating_point() and k in w_one:
            d_one.append((w_one[k] - v).flatten())
            d_two.append((w_two[k] - v).flatten())
    d_one, d_two = torch.cat(d_one), torch.cat(d_two)
    assert d_one.norm() > 0
    rel = ((d_one - d_two).norm() / d_one.norm()).item()
    cos = torch.nn.functional.cosine_similarity(d_one, d_two, dim=0).item()
    print(f"update difference: relative {rel:.4f}, cosine {cos:.5f}")
    assert rel < 0.1 and cos > 0.99, f"updates differ: relative {rel:.3f}, cosine {cos:.4f}"


def _normalizer_worker(out_dir):
    """Rank 0 has 1 target mask, rank 1 has 5: the criterion must use the global averages."""
    from detectron2.utils import comm

    from segclip_d2.modeling.criterion import SetCriterion
    from segclip_d2.modeling.matcher import HungarianMatcher

    rank = comm.get_rank()
    num_targets = 1 if rank == 0 else 5
    crit = SetCriterion(7, HungarianMatcher(num_points=16), no_object_weight=0.1, num_points=16)
    outputs = {"pred_logits": torch.zeros(1, 6, 8), "pred_masks": torch.zeros(1, 6, 4, 4)}
    targets = [
        {
            "labels": torch.arange(num_targets),
            "masks": torch.ones(num_targets, 16, 16, dtype=torch.bool),
        }
    ]
    norms = crit._global_normalizers(outputs, targets, torch.device("cpu"))
    (out_dir / f"rank{rank}.json").write_text(json.dumps(norms))


def test_criterion_normalisers_are_global(tmp_path):
    from segclip_d2.engine.launch import launch

    launch(_normalizer_worker, 2, dist_url="auto", args=(tmp_path,))
    for rank in (0, 1):
        norms = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert norms["num_masks"] == pytest.approx(3.0)  # (1 + 5) / 2
        # Matched queries weigh 1, the others 0.1: ((1 + 0.5) + (5 + 0.1)) / 2.
        assert norms["ce"] == pytest.approx(3.3)
