"""HungarianMatcher: the assignment minimises the total point-sampled cost (brute force check)."""

import itertools

import pytest
import torch

from segclip_d2.modeling.matcher import HungarianMatcher


def _random_case(num_queries, num_targets, num_classes=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(1, num_queries, num_classes + 1, generator=g),
        "pred_masks": torch.randn(1, num_queries, size // 4, size // 4, generator=g) * 3,
    }
    labels = torch.randperm(num_classes, generator=g)[:num_targets].sort().values
    masks = torch.rand(num_targets, size, size, generator=g) > 0.5
    return outputs, [{"labels": labels, "masks": masks}]


def _brute_force_min(cost: torch.Tensor) -> float:
    num_queries, num_targets = cost.shape
    if num_queries >= num_targets:
        perms = itertools.permutations(range(num_queries), num_targets)
        return min(sum(cost[q, t].item() for t, q in enumerate(p)) for p in perms)
    perms = itertools.permutations(range(num_targets), num_queries)
    return min(sum(cost[q, t].item() for q, t in enumerate(p)) for p in perms)


@pytest.mark.parametrize(
    "num_queries,num_targets,seed", [(5, 3, 0), (4, 4, 1), (6, 1, 2), (6, 4, 3), (3, 3, 4)]
)
def test_matcher_minimises_total_cost(num_queries, num_targets, seed):
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=64)
    outputs, targets = _random_case(num_queries, num_targets, seed=seed)
    coords = [torch.rand(64, 2, generator=torch.Generator().manual_seed(seed + 100))]
    cost = matcher.cost_matrices(outputs, targets, coords)[0]
    assert cost.shape == (num_queries, num_targets)
    (pred_idx, tgt_idx) = matcher(outputs, targets, coords)[0]
    assert len(pred_idx) == len(tgt_idx) == min(num_queries, num_targets)
    assert len(set(pred_idx.tolist())) == len(pred_idx), "a prediction was assigned twice"
    assert sorted(tgt_idx.tolist()) == list(range(num_targets)), "every target is matched once"
    total = cost[pred_idx, tgt_idx].sum().item()
    assert total == pytest.approx(_brute_force_min(cost), abs=1e-5)


def test_cost_terms_match_their_definitions():
    """A perfect, confident prediction of target 0 costs less than every other pairing."""
    matcher = HungarianMatcher(cost_class=1.0, cost_mask=1.0, cost_dice=1.0, num_points=256)
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[0, :, :8] = True
    masks[1, :, 8:] = True
    pred_masks = torch.full((1, 3, 16, 16), -20.0)
    pred_masks[0, 2, :, :8] = 20.0  # query 2 is target 0
    pred_masks[0, 0, :, 8:] = 20.0  # query 0 is target 1
    logits = torch.full((1, 3, 4), -10.0)
    logits[0, 2, 1] = 10.0
    logits[0, 0, 3] = 10.0
    targets = [{"labels": torch.tensor([1, 3]), "masks": masks}]
    # Points at pixel centres away from the boundary so the bilinear reads are exact.
    xs = (torch.arange(16, dtype=torch.float32) + 0.5) / 16
    grid = torch.stack(torch.meshgrid(xs, xs, indexing="xy"), -1).reshape(-1, 2)
    grid = grid[(grid[:, 0] < 7 / 16) | (grid[:, 0] > 9 / 16)]
    out = {"pred_logits": logits, "pred_masks": pred_masks}
    cost = matcher.cost_matrices(out, targets, [grid])[0]
    assert cost[2, 0] == pytest.approx(-1.0, abs=1e-3)  # -p(class) = -1, BCE ~ 0, dice ~ 0
    assert cost[0, 1] == pytest.approx(-1.0, abs=1e-3)
    pred_idx, tgt_idx = matcher(out, targets, [grid])[0]
    assert dict(zip(tgt_idx.tolist(), pred_idx.tolist())) == {0: 2, 1: 0}


def test_no_targets_gives_empty_match():
    matcher = HungarianMatcher(num_points=32)
    outputs, _ = _random_case(4, 0)
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 16, 16)}]
    (pred_idx, tgt_idx) = matcher(outputs, targets)[0]
    assert pred_idx.numel() == 0 and tgt_idx.numel() == 0
    assert pred_idx.dtype == torch.int64


def test_batch_matches_each_image_independently():
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=64)
    o1, t1 = _random_case(5, 2, seed=7)
    o2, t2 = _random_case(5, 3, seed=8)
    both = {k: torch.cat([o1[k], o2[k]]) for k in o1}
    coords = [torch.rand(64, 2), torch.rand(64, 2)]
    joint = matcher(both, t1 + t2, coords)
    single = matcher(o1, t1, coords[:1]) + matcher(o2, t2, coords[1:])
    for (a, b), (c, d) in zip(joint, single):
        assert torch.equal(a, c) and torch.equal(b, d)
