"""Training machinery: LR schedule, optimizer groups, clipping, sampler, a short run whose loss
falls, exact resume, train_net.main end to end (evaluation, best checkpoint, colour prediction).
"""

import json
import math
import os
import sys
from pathlib import Path

import cv2
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.engine import HookBase
from detectron2.utils.env import seed_all_rng
from torch import nn

import segclip_d2  # noqa: F401
import segclip_d2.modeling.meta_arch  # noqa: F401
from segclip_d2 import add_segclip_config
from segclip_d2.checkpoint.files import read_checkpoint
from segclip_d2.config import load_config
from segclip_d2.engine import SegCLIPTrainer, WarmupPolyLR, build_gradient_clipper
from segclip_d2.engine.data import PositionedTrainingSampler
from segclip_d2.engine.optimizer import get_param_groups

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # train_net.py lives at the repo root

# The tiny model (hidden size 32, one encoder layer); test_deploy.py uses it too.
TINY_MODEL_OPTS = [
    "MODEL.SEGCLIP.NUM_QUERIES", "10",
    "MODEL.SEGCLIP.HIDDEN_DIM", "32",
    "MODEL.SEGCLIP.NHEADS", "2",
    "MODEL.SEGCLIP.DIM_FEEDFORWARD", "64",
    "MODEL.SEGCLIP.DEC_LAYERS", "2",
    "MODEL.SEGCLIP.MASK_DIM", "32",
    "MODEL.SEGCLIP.PIXEL_DECODER.CONVS_DIM", "32",
    "MODEL.SEGCLIP.PIXEL_DECODER.ENC_LAYERS", "1",
    "MODEL.SEGCLIP.PIXEL_DECODER.DIM_FEEDFORWARD", "64",
]  # fmt: skip

TINY_OPTS = TINY_MODEL_OPTS + [
    "MODEL.SEGCLIP.LOSS.TRAIN_NUM_POINTS", "256",
    "INPUT.CROP.SIZE", "(64, 64)",
    "INPUT.RESIZE_SCALE", "(1.0, 1.0)",
    "INPUT.COLOR_AUG", "False",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.WARMUP_ITERS", "0",
    "SOLVER.CHECKPOINT_PERIOD", "1000",
    "DATALOADER.NUM_WORKERS", "0",
    "DATASETS.TEST", "()",
    "TEST.EVAL_PERIOD", "0",
    "SEED", "7",
]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two OpenMP threads per process can be
    10x slower than one (spin-waiting); the results do not depend on it."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny_synthetic(tmp_path_factory):
    """A 4-train / 2-val synthetic aerial set of 64 px tiles in a temporary dataset root."""
    root = tmp_path_factory.mktemp("datasets")
    env = {
        "DETECTRON2_DATASETS": str(root),
        "SEGCLIP_SYNTHETIC_NUM_TRAIN": "4",
        "SEGCLIP_SYNTHETIC_NUM_VAL": "2",
        "SEGCLIP_SYNTHETIC_SIZE": "64",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def tiny_cfg(output_dir, *opts):
    config = str(REPO / "configs" / "synthetic" / "segclip_cpu.yaml")
    return load_config(config, TINY_OPTS + ["OUTPUT_DIR", str(output_dir)] + list(opts))


# ---------------------------------------------------------------------- unit parts
def test_warmup_poly_lr():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = WarmupPolyLR(opt, max_iters=100, warmup_factor=0.1, warmup_iters=10, power=0.9)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[5] == pytest.approx((0.1 * 0.5 + 0.5) * (1 - 5 / 100) ** 0.9)
    assert lrs[50] == pytest.approx((1 - 0.5) ** 0.9)
    assert lrs[99] == pytest.approx((1 / 100) ** 0.9)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])), "decreasing after warmup"


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.head = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.query_embed = nn.Embedding(5, 4)
        self.level_embed = nn.Parameter(torch.zeros(3, 4))
        self.frozen = nn.Linear(4, 4).requires_grad_(False)


def test_param_groups():
    groups = {g["name"]: g for g in get_param_groups(_Toy(), 1e-4, 0.05, 0.0, 0.0, 0.1)}
    assert "frozen.weight" not in groups, "frozen parameters are not optimised"
    assert groups["backbone.0.weight"]["lr"] == pytest.approx(1e-5)
    assert groups["backbone.0.weight"]["weight_decay"] == 0.05
    assert groups["backbone.1.weight"]["weight_decay"] == 0.0  # norm
    assert groups["head.weight"]["lr"] == 1e-4 and groups["head.weight"]["weight_decay"] == 0.05
    assert groups["norm.weight"]["weight_decay"] == 0.0
    assert groups["query_embed.weight"]["weight_decay"] == 0.0
    assert groups["level_embed"]["weight_decay"] == 0.0


def test_full_model_gradient_clipping():
    cfg = add_segclip_config(get_cfg())
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.5
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(4))
    a.grad, b.grad = torch.full((3,), 3.0), torch.full((4,), 4.0)
    build_gradient_clipper(cfg)([a, b])
    total = torch.cat([a.grad, b.grad]).norm().item()
    assert total == pytest.approx(0.5, rel=1e-4)
    assert (a.grad / b.grad[0]).allclose(torch.full((3,), 0.75)), "one common scale factor"
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False
    assert build_gradient_clipper(cfg) is None


def test_sampler_splits_global_stream_and_resumes():
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    single = take(PositionedTrainingSampler(5, seed=3, rank=0, world=1), 12)
    r0 = take(PositionedTrainingSampler(5, seed=3, rank=0, world=2), 6)
    r1 = take(PositionedTrainingSampler(5, seed=3, rank=1, world=2), 6)
    assert sorted(r0 + r1) == single, "two processes together see the one-process stream"
    assert [p for p, _ in r0] == list(range(0, 12, 2))
    for epoch in range(2):
        assert sorted(i for _, i in single[5 * epoch : 5 * epoch + 5]) == list(range(5))
    resumed = take(PositionedTrainingSampler(5, seed=3, start=7, rank=0, world=1), 5)
    assert resumed == single[7:12]


# ---------------------------------------------------------------------- training runs
class _Recorder(HookBase):
    def __init__(self, stop_after=None):
        self.losses = []
        self.stop_after = stop_after

    def after_step(self):
        self.losses.append(self.trainer.storage.history("total_loss").latest())
        if self.stop_after is not None and self.trainer.iter + 1 == self.stop_after:
            raise KeyboardInterrupt("simulated interruption")


def _train(cfg, resume=False, stop_after=None):
    seed_all_rng(cfg.SEED)
    trainer = SegCLIPTrainer(cfg)
    trainer.resume_or_load(resume=resume)
    rec = _Recorder(stop_after)
    trainer.register_hooks([rec])
    try:
        trainer.train()
    except KeyboardInterrupt:
        pass
    return trainer, rec.losses


@pytest.mark.slow
def test_short_training_loss_falls(tiny_synthetic, tmp_path):
    cfg = tiny_cfg(
        tmp_path,
        *("SOLVER.MAX_ITER", "40", "SOLVER.BASE_LR", "0.002"),
        *("SOLVER.LR_SCHEDULER_NAME", "WarmupMultiStepLR", "SOLVER.STEPS", "()"),
        *("INPUT.RANDOM_VFLIP", "False", "INPUT.RANDOM_ROTATE90", "False"),
    )
    _, losses = _train(cfg)
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, f"loss did not fall clearly: {first:.2f} -> {last:.2f}"


def test_resume_gives_the_same_weights(tiny_synthetic, tmp_path):
    """4 iterations straight == 2 iterations, interruption, --resume, 2 more (same weights)."""
    opts = ["SOLVER.MAX_ITER", "4", "SOLVER.BASE_LR", "0.001", "SOLVER.CHECKPOINT_PERIOD", "2"]
    straight, _ = _train(tiny_cfg(tmp_path / "a", *opts))
    _, first = _train(tiny_cfg(tmp_path / "b", *opts), stop_after=2)
    assert len(first) == 2 and (tmp_path / "b" / "model_0000001.pth").is_file()
    resumed, second = _train(tiny_cfg(tmp_path / "b", *opts), resume=True)
    assert resumed.start_iter == 2 and len(second) == 2
    a = straight.model.state_dict()
    b = resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    # The optimizer state was restored too (AdamW moments).
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys() and sa[0]["step"] == sb[0]["step"] == 4


@pytest.mark.slow
def test_train_net_main_end_to_end(tiny_synthetic, tmp_path):
    """main(args): trains, evaluates (mIoU), keeps model_best.pth next to the periodic
    checkpoint tag, writes metrics.json and the colour prediction; then --eval-only works."""
    import train_net

    out = tmp_path / "run"
    common = TINY_OPTS + ["DATASETS.TEST", "('synthetic_aerial_val',)", "OUTPUT_DIR", str(out)]
    argv = ["--config-file", str(REPO / "configs/synthetic/segclip_cpu.yaml")]
    args = train_net.build_parser().parse_args(
        argv + common + ["SOLVER.MAX_ITER", "4", "TEST.EVAL_PERIOD", "2"]
    )
    results = train_net.main(args)
    assert 0 <= results["sem_seg"]["mIoU"] <= 100
    assert (out / "model_best.pth").is_file() and (out / "model_final.pth").is_file()
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    best = read_checkpoint(out / "model_best.pth")
    assert best["best_metric"] == pytest.approx(
        max(
            json.loads(line)["sem_seg/mIoU"]
            for line in (out / "metrics.json").read_text().splitlines()
            if "sem_seg/mIoU" in line
        )
    )
    assert (out / "predictions" / "val_0000_color.png").is_file()
    panel = cv2.imread(str(out / "predictions" / "val_0000_panel.png"))
    assert panel.shape[1] > 3 * 64 and panel.shape[0] > 64  # 3 tiles of 64 px + legend
    assert (out / "curves.png").stat().st_size > 1000
    assert list(out.glob("events.out.tfevents.*")), "TensorBoard events are written by default"
    card = best["model_card"]  # the checkpoint describes itself, metrics at save time included
    assert card["metrics"]["sem_seg/mIoU"] == pytest.approx(best["best_metric"])
    assert card["training"]["iteration"] == best["iteration"] and len(card["text_embeddings"]) == 7
    final = read_checkpoint(out / "model_final.pth")
    assert final["model_card"]["class_names"] == card["class_names"]
    # model_final's card holds the final evaluation (of its own weights), so the export keeps it
    from segclip_d2.deploy.export import export_card

    metrics = final["model_card"]["metrics"]
    assert metrics["sem_seg/mIoU"] == pytest.approx(results["sem_seg"]["mIoU"])
    assert metrics["evaluated_at_iteration"] == final["model_card"]["training"]["iteration"] == 3
    assert export_card(final["model_card"])["metrics"] == metrics
    assert final["iteration"] == 3 and final["trainer"]["iteration"] == 3

    args = train_net.build_parser().parse_args(
        argv + ["--eval-only"] + common + ["MODEL.WEIGHTS", str(out / "model_best.pth")]
    )
    again = train_net.main(args)
    assert again["sem_seg"]["mIoU"] == pytest.approx(best["best_metric"], abs=1e-6)


def test_train_net_eval_flags_set_tta_and_precision(tmp_path):
    """`--tta` and `--precision` are the evaluation's TTA and precision config keys."""
    import train_net

    argv = ["--config-file", str(REPO / "configs/synthetic/segclip_cpu.yaml"), "--eval-only"]
    opts = ["OUTPUT_DIR", str(tmp_path / "ev")]
    cfg = train_net.setup(train_net.build_parser().parse_args(argv + opts))
    assert cfg.TEST.TTA.ENABLED is False and cfg.TEST.PRECISION == "auto"  # the default
    args = train_net.build_parser().parse_args(argv + ["--tta", "--precision", "bf16"] + opts)
    cfg = train_net.setup(args)
    assert cfg.TEST.TTA.ENABLED is True and cfg.TEST.PRECISION == "bf16"
    from segclip_d2.errors import UserError

    with pytest.raises(UserError, match="--precision.*int8"):  # names the allowed values
        train_net.build_parser().parse_args(argv + ["--precision", "int8"])
