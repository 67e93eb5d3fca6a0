"""SetCriterion: weighted losses, empty images, the guidance group's fixed assignment."""

import pytest
import torch

from segclip_d2.config import add_segclip_config
from segclip_d2.modeling.criterion import SetCriterion, build_criterion
from segclip_d2.modeling.matcher import HungarianMatcher

K = 4


def _criterion(**kw):
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=256)
    args = dict(num_points=256, deep_supervision=True)
    args.update(kw)
    return SetCriterion(K, matcher, **args)


class _FixedMatcher(torch.nn.Module):
    def __init__(self, indices):
        super().__init__()
        self.indices = indices

    def forward(self, outputs, targets):
        return self.indices


def _outputs(bs=2, nq=6, h=8, num_aux=2, guidance_t=None, seed=0):
    g = torch.Generator().manual_seed(seed)

    def pred(q):
        return {
            "pred_logits": torch.randn(bs, q, K + 1, generator=g).requires_grad_(),
            "pred_masks": torch.randn(bs, q, h, h, generator=g).requires_grad_(),
        }

    out = pred(nq)
    out["aux_outputs"] = [pred(nq) for _ in range(num_aux)]
    if guidance_t is not None:
        gd = pred(guidance_t)
        gd["aux_outputs"] = [pred(guidance_t) for _ in range(num_aux)]
        out["guidance"] = gd
    return out


def _leaves(out):
    yield out["pred_logits"]
    yield out["pred_masks"]
    for a in out.get("aux_outputs", []):
        yield from _leaves(a)
    if out.get("guidance") is not None:
        yield from _leaves(out["guidance"])


def _targets_from_sem_seg(sem_seg):
    """Like the meta-arch: sorted present classes (ignore 255 excluded) and their masks."""
    targets = []
    for seg in sem_seg:
        classes = [c for c in torch.unique(seg).tolist() if c != 255]
        labels = torch.tensor(classes, dtype=torch.int64)
        masks = torch.stack([seg == c for c in classes]) if classes else torch.zeros(0, *seg.shape)
        targets.append({"labels": labels, "masks": masks})
    return targets


def _check_finite_and_backward(losses, out):
    total = sum(losses.values())
    assert all(torch.isfinite(v) for v in losses.values()), losses
    total.backward()
    for t in _leaves(out):
        assert t.grad is not None and torch.isfinite(t.grad).all()


def test_loss_keys_and_weights():
    crit = _criterion(guidance_weight=0.5)
    seg = torch.zeros(2, 32, 32, dtype=torch.int64)
    seg[0, :16] = 2
    seg[1, :, :8] = 3
    targets = _targets_from_sem_seg(seg)
    out = _outputs(guidance_t=2)
    out["guidance"]["valid"] = torch.tensor([[True, True], [True, True]])
    torch.manual_seed(0)
    losses = crit(out, targets)
    names = [f"loss_{p}{n}" for p in ("", "gtg_") for n in ("ce", "mask", "dice")]
    expected = {f"{k}{s}" for k in names for s in ("", "_0", "_1")}
    assert set(losses) == expected
    # Weighted: the same criterion with unit weights gives the unweighted values.
    unit = _criterion(class_weight=1.0, mask_weight=1.0, dice_weight=1.0, guidance_weight=1.0)
    torch.manual_seed(0)
    raw = unit(out, targets)
    assert losses["loss_ce"].item() == pytest.approx(2.0 * raw["loss_ce"].item(), rel=1e-5)
    assert losses["loss_mask"].item() == pytest.approx(5.0 * raw["loss_mask"].item(), rel=1e-5)
    assert losses["loss_dice"].item() == pytest.approx(5.0 * raw["loss_dice"].item(), rel=1e-5)
    assert losses["loss_gtg_ce"].item() == pytest.approx(
        0.5 * 2.0 * raw["loss_gtg_ce"].item(), rel=1e-5
    )
    _check_finite_and_backward(losses, out)


def test_class_loss_normalised_like_weighted_cross_entropy():
    """Mask2Former: F.cross_entropy(logits, classes, weight=[1]*K + [eos]) with mean reduction."""
    crit = _criterion(deep_supervision=False)
    seg = torch.zeros(1, 32, 32, dtype=torch.int64)
    seg[0, :10] = 1
    targets = _targets_from_sem_seg(seg)
    out = _outputs(bs=1, num_aux=0)
    indices = crit.matcher(out, targets)
    classes = torch.full((1, 6), K)
    classes[0, indices[0][0]] = targets[0]["labels"][indices[0][1]]
    weight = torch.ones(K + 1)
    weight[-1] = 0.1
    expected = torch.nn.functional.cross_entropy(
        out["pred_logits"].transpose(1, 2), classes, weight
    )
    crit.matcher = _FixedMatcher(indices)  # reuse the same assignment
    losses = crit(out, targets)
    assert losses["loss_ce"].item() == pytest.approx(2.0 * expected.item(), rel=1e-5)


@pytest.mark.parametrize("fill", [None, 255])
def test_image_without_foreground_or_all_ignore(fill):
    """T_i = 0 (an all-ignore image, or a batch of them): finite losses, backward works."""
    crit = _criterion()
    seg = torch.full((2, 32, 32), 255, dtype=torch.int64)
    if fill is None:
        seg[0] = 1  # one labelled image, one all-ignore image
    targets = _targets_from_sem_seg(seg)
    assert targets[1]["labels"].numel() == 0
    t = max(int(x["labels"].numel()) for x in targets)
    out = _outputs(guidance_t=t)
    out["guidance"]["valid"] = torch.tensor(
        [[j < x["labels"].numel() for j in range(t)] for x in targets]
    ).reshape(2, t)
    losses = crit(out, targets)
    if fill == 255:
        assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
        # Every query is pushed to no-object.
        logits = out["pred_logits"].detach()
        expected = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), torch.full((2, 6), K), reduction="mean"
        )
        assert losses["loss_ce"].item() == pytest.approx(2.0 * expected.item(), rel=1e-5)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    # Mask losses are zero but graph-connected: pred_masks receives a (zero) gradient.
    assert out["pred_masks"].grad is not None
    assert torch.isfinite(out["pred_masks"].grad).all()


def test_guidance_uses_fixed_assignment():
    """A perfect guidance prediction (query j = target j) has ~0 guidance losses; permuting
    the guidance queries makes them large (no matching rescues a wrong order)."""
    # Uniform points: importance sampling would put most points on the boundary, where the
    # bilinearly read labels are fractional and even a perfect prediction has some BCE.
    crit = _criterion(deep_supervision=False, importance_sample_ratio=0.0, num_points=4096)
    seg = torch.zeros(1, 256, 256, dtype=torch.int64)
    seg[0, :, 128:] = 2
    seg[0, 192:] = 3
    targets = _targets_from_sem_seg(seg)  # labels [0, 2, 3]
    labels, masks = targets[0]["labels"], targets[0]["masks"].float()
    out = _outputs(bs=1, num_aux=0, h=32)
    logits = torch.full((1, 3, K + 1), -20.0)
    logits[0, torch.arange(3), labels] = 20.0
    guidance = {
        "pred_logits": logits.clone().requires_grad_(),
        "pred_masks": ((masks * 2 - 1) * 10)[None].clone().requires_grad_(),  # (1, 3, 256, 256)
        "valid": torch.ones(1, 3, dtype=torch.bool),
    }
    out["guidance"] = guidance
    losses = crit(out, targets)
    assert losses["loss_gtg_ce"].item() < 1e-6
    assert losses["loss_gtg_mask"].item() < 0.1
    assert losses["loss_gtg_dice"].item() < 0.05

    perm = torch.tensor([1, 2, 0])
    out["guidance"] = {
        "pred_logits": logits[:, perm],
        "pred_masks": guidance["pred_masks"].detach()[:, perm],
        "valid": guidance["valid"],
    }
    wrong = crit(out, targets)
    assert wrong["loss_gtg_ce"].item() > 10
    assert wrong["loss_gtg_mask"].item() > 10
    assert wrong["loss_gtg_dice"].item() > 1


def test_guidance_padding_slots_are_not_scored():
    """A padding slot's class and mask predictions change no guidance loss (class, mask BCE,
    dice), while a valid slot's mask does: same seed for every call (the points are sampled)."""
    crit = _criterion(deep_supervision=False)
    seg = torch.zeros(2, 32, 32, dtype=torch.int64)
    seg[0, :8] = 1  # image 0: classes [0, 1]; image 1: [0]
    targets = _targets_from_sem_seg(seg)
    out = _outputs(num_aux=0, guidance_t=2)
    out["guidance"]["valid"] = torch.tensor([[True, True], [True, False]])
    keys = ("loss_gtg_ce", "loss_gtg_mask", "loss_gtg_dice")

    def losses():
        torch.manual_seed(0)
        result = crit(out, targets)
        return {k: result[k].item() for k in keys}

    base = losses()
    with torch.no_grad():  # change only the padding slot's prediction
        out["guidance"]["pred_logits"][1, 1, 0] += 50.0  # one class: the softmax moves
        out["guidance"]["pred_masks"][1, 1] -= 50.0
    assert losses() == pytest.approx(base, rel=1e-6, abs=0)
    with torch.no_grad():  # a valid slot's mask is scored
        out["guidance"]["pred_masks"][1, 0] -= 50.0
    moved = losses()
    assert moved["loss_gtg_mask"] > base["loss_gtg_mask"] + 1
    assert moved["loss_gtg_dice"] != pytest.approx(base["loss_gtg_dice"], rel=1e-3)
    bad = torch.tensor([[True, True], [False, True]])
    out["guidance"]["valid"] = bad
    with pytest.raises(ValueError, match="valid"):
        crit(out, targets)


def test_build_criterion_reads_config():
    from detectron2.config import get_cfg

    cfg = add_segclip_config(get_cfg())
    cfg.MODEL.SEGCLIP.LOSS.TRAIN_NUM_POINTS = 100
    cfg.MODEL.SEGCLIP.LOSS.DEEP_SUPERVISION = False
    cfg.MODEL.SEGCLIP.GT_GUIDANCE.LOSS_WEIGHT = 0.3
    crit = build_criterion(cfg, 7)
    assert crit.num_classes == 7 and crit.num_points == 100 and crit.matcher.num_points == 100
    assert not crit.deep_supervision and crit.guidance_weight == 0.3
    assert crit.empty_weight[-1].item() == pytest.approx(0.1)
