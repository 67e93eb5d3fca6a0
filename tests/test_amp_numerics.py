"""AMP-safe numerics: the matcher, the criterion and a whole training step under CPU fp16 autocast
(the CUDA AMP path, run where there is no GPU) give finite results equal to fp32.

The hard case: confident masks (|logit| 30) and classes covering most of the image, at the
default 12,544 points. Inside fp16 autocast the matcher's BCE cost ``pos @ targets.T`` sums
30 x ~11,000 = 330,000 > 65,504 and becomes inf.
"""

import pytest
import torch
from test_train import tiny_synthetic  # noqa: F401  (fixture)

from segclip_d2.modeling.criterion import SetCriterion
from segclip_d2.modeling.matcher import HungarianMatcher

K = 6
P = 12544


def _confident_case(seed: int, bs: int = 2, nq: int = 10, size: int = 128):
    """Predictions: confident masks (|logit| 30, some empty); targets: one class covering
    70-90 % of each image plus small ones."""
    g = torch.Generator().manual_seed(seed)
    h = size // 4
    masks = torch.where(torch.rand(bs, nq, h, h, generator=g) > 0.5, 30.0, -30.0)
    masks[:, : nq // 3] = -30.0  # confident empty masks
    logits = torch.randn(bs, nq, K + 1, generator=g) * 4
    targets = []
    for _ in range(bs):
        label = torch.zeros(size, size, dtype=torch.int64)
        cut = int(size * (0.1 + 0.2 * torch.rand(1, generator=g).item()))
        label[:cut, : size // 2] = 1
        label[:cut, size // 2 :] = 2  # class 0 covers 70-90 % of the image
        classes = label.unique()
        targets.append({"labels": classes, "masks": label[None] == classes[:, None, None]})
    return {"pred_logits": logits, "pred_masks": masks}, targets


def _half(outputs):
    """The model's outputs as fp16 autocast would give them."""
    return {k: v.half() for k, v in outputs.items()}


def test_matcher_under_fp16_autocast_is_finite_and_equals_fp32():
    matcher = HungarianMatcher(num_points=P)
    agree = total = 0
    for seed in range(4):
        outputs, targets = _confident_case(seed)
        coords = [torch.rand(P, 2, generator=torch.Generator().manual_seed(seed))] * 2
        ref_cost = matcher.cost_matrices(outputs, targets, coords)
        ref = matcher(outputs, targets, coords)
        with torch.autocast("cpu", dtype=torch.float16):
            half = _half(outputs)
            cost = matcher.cost_matrices(half, targets, coords)
            got = matcher(half, targets, coords)
        for c, rc in zip(cost, ref_cost):
            assert c.dtype == torch.float32 and torch.isfinite(c).all()
            # The inputs were rounded to fp16 (30.0 and the logits): costs agree to fp16 input
            # rounding, not to fp16 arithmetic over 12,544 points.
            torch.testing.assert_close(c, rc, rtol=2e-3, atol=2e-2)
        for (pi, ti), (rpi, rti) in zip(got, ref):
            total += 1
            agree += int(torch.equal(pi, rpi) and torch.equal(ti, rti))
    print(f"fp16 / fp32 matcher assignment agreement: {agree}/{total} images")
    assert agree == total


def test_matcher_inputs_that_overflow_fp16_matmul():
    """The sum the old matcher computed inside autocast really overflows fp16: the test above
    would fail if the cost ran in fp16."""
    outputs, targets = _confident_case(0)
    pts = torch.full((1, P), 30.0)  # BCE of a confident empty mask where the target is 1
    tgt = (torch.rand(1, P) < 0.8).float()
    with torch.autocast("cpu", dtype=torch.float16):
        assert not torch.isfinite(pts @ tgt.T).all()


def _criterion():
    return SetCriterion(K, HungarianMatcher(num_points=P), num_points=P)


def test_criterion_under_fp16_autocast_is_finite_and_equals_fp32():
    for seed in range(2):
        outputs, targets = _confident_case(seed)
        outputs["aux_outputs"] = [dict(outputs)]
        torch.manual_seed(seed)
        ref = _criterion()(outputs, targets)
        half = _half({k: outputs[k] for k in ("pred_logits", "pred_masks")})
        half = {k: v.requires_grad_() for k, v in half.items()}
        half["aux_outputs"] = [dict(half)]
        torch.manual_seed(seed)
        with torch.autocast("cpu", dtype=torch.float16):
            got = _criterion()(half, targets)
        assert set(got) == set(ref)
        for k in ref:
            assert got[k].dtype == torch.float32 and torch.isfinite(got[k]), k
            # Same points (same seed); differences come from rounding the inputs to fp16.
            assert got[k].item() == pytest.approx(ref[k].item(), rel=5e-3, abs=1e-3), k
        sum(got.values()).backward()
        assert torch.isfinite(half["pred_masks"].grad).all()
        assert half["pred_masks"].grad.dtype == torch.float16


@pytest.mark.usefixtures("tiny_synthetic")
def test_training_step_with_cpu_fp16_autocast_and_grad_scaler(tmp_path):
    """A whole step of the tiny model: CPU fp16 autocast + torch.amp.GradScaler("cpu") against
    fp32 from the same weights and batch."""
    from detectron2.modeling import build_model
    from test_train import tiny_cfg  # tests/ is on sys.path (rootdir import mode)

    from segclip_d2.data.mapper import build_train_mapper
    from segclip_d2.engine.data import build_train_loader

    torch.set_num_threads(1)
    cfg = tiny_cfg(tmp_path, "MODEL.SEGCLIP.LOSS.TRAIN_NUM_POINTS", str(P))
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    data = next(iter(build_train_loader(cfg, build_train_mapper(cfg))))
    init = {k: v.clone() for k, v in model.state_dict().items()}

    def step(dtype, scaler):
        model.load_state_dict(init)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            losses = model(data)
        total = sum(v.float() for v in losses.values())
        opt.zero_grad()
        scaler.scale(total).backward()
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return {k: v.item() for k, v in losses.items()}, grads / scale, scaler.get_scale() < scale

    ref, ref_grads, _ = step(None, torch.amp.GradScaler("cpu", enabled=False))
    # The trainer's scaler starts at 2**16 and halves on overflow: on this model the first 4 steps
    # are skipped (normal). Started at 2**12 to keep the test short.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    skipped = 0
    got, grads, was_skipped = step(torch.float16, scaler)
    while was_skipped and skipped < 5:
        skipped += 1
        got, grads, was_skipped = step(torch.float16, scaler)
    print(f"fp16 step taken after {skipped} skipped steps (scale {scaler.get_scale():.0f})")
    assert skipped <= 1, "the scaler kept skipping steps: inf/NaN gradients"
    for k in ref:
        assert torch.isfinite(torch.tensor(got[k])), k
        assert got[k] == pytest.approx(ref[k], rel=0.05, abs=0.02), k
    assert torch.isfinite(grads).all()
    cos = torch.nn.functional.cosine_similarity(grads, ref_grads, dim=0).item()
    print(
        f"fp16 / fp32 gradient cosine: {cos:.4f}; total loss {sum(got.values()):.4f} vs "
        f"{sum(ref.values()):.4f}"
    )
    assert cos > 0.98
