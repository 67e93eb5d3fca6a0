"""Hungarian matching between N predicted (class, mask) pairs and an image's ground-truth masks.

Cost of assigning prediction ``q`` to target ``t`` (Mask2Former's, computed on points)::

    C[q, t] = w_class * (-p_q(c_t)) + w_mask * BCE(m_q, g_t) + w_dice * dice(m_q, g_t)

where ``p_q`` is the softmax class distribution, ``m_q`` the mask logits and ``g_t`` the binary
target mask, both read at the same ``num_points`` uniformly random points of the image.

The costs are computed in float32 with autocast disabled (as in Mask2Former): under fp16 AMP the
BCE cost's sum over 12,544 points passes fp16's 65,504 as soon as a confident mask meets a class
covering about half the image, and the cost would become inf.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from .point_sampling import point_sample


def batch_dice_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pairwise dice loss. inputs (N, P) logits, targets (T, P) in {0, 1} -> (N, T)."""
    probs = inputs.sigmoid()
    numerator = 2 * probs @ targets.T  # (N, T)
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def batch_sigmoid_ce_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pairwise mean binary cross-entropy. inputs (N, P) logits, targets (T, P) -> (N, T)."""
    num_points = inputs.shape[1]
    pos = nn.functional.binary_cross_entropy_with_logits(
        inputs, torch.ones_like(inputs), reduction="none"
    )  # (N, P): cost where the target is 1
    neg = nn.functional.binary_cross_entropy_with_logits(
        inputs, torch.zeros_like(inputs), reduction="none"
    )  # (N, P): cost where the target is 0
    return (pos @ targets.T + neg @ (1 - targets).T) / num_points


class HungarianMatcher(nn.Module):
    """One-to-one assignment of predictions to targets minimising the total cost.

    The default weights are the project's (``MODEL.SEGCLIP.LOSS`` CLASS/MASK/DICE_WEIGHT 2/5/5).

    Args:
        cost_class: weight of the class cost (``-p(class)``).
        cost_mask: weight of the mask sigmoid BCE cost.
        cost_dice: weight of the mask dice cost.
        num_points: points sampled uniformly per image, shared between predictions and targets.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        num_points: int = 12544,
    ):
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("all matching costs are 0")
        if num_points <= 0:
            raise ValueError(f"num_points must be positive, got {num_points}")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def cost_matrices(
        self,
        outputs: dict,
        targets: list[dict],
        point_coords: list[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Cost matrices (N, T_i) per image, on CPU as float32, with autocast off (module doc).

        Args:
            outputs: ``pred_logits`` (B, N, K+1) and ``pred_masks`` (B, N, h, w) logits.
            targets: per image ``labels`` (T_i,) int64 and ``masks`` (T_i, H, W).
            point_coords: optional (P, 2) points (x, y) in [0, 1] per image; drawn uniformly
                (``num_points`` of them) when omitted.
        """
        device_type = outputs["pred_logits"].device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return self._cost_matrices(outputs, targets, point_coords)

    def _cost_matrices(
        self, outputs: dict, targets: list[dict], point_coords: list[torch.Tensor] | None
    ) -> list[torch.Tensor]:
        pred_logits = outputs["pred_logits"]  # (B, N, K+1)
        pred_masks = outputs["pred_masks"]  # (B, N, h, w)
        bs, num_queries = pred_logits.shape[:2]
        if len(targets) != bs:
            raise ValueError(f"{bs} predictions but {len(targets)} targets")
        costs = []
        for b in range(bs):
            tgt_ids = targets[b]["labels"]  # (T,)
            num_targets = int(tgt_ids.numel())
            if num_targets == 0:
                costs.append(torch.zeros(num_queries, 0))
                continue
            prob = pred_logits[b].float().softmax(-1)  # (N, K+1)
            cost_class = -prob[:, tgt_ids]  # (N, T)

            out_mask = pred_masks[b].float()[:, None]  # (N, 1, h, w)
            tgt_mask = targets[b]["masks"].to(out_mask)[:, None]  # (T, 1, H, W)
            if point_coords is None:
                coords = torch.rand(1, self.num_points, 2, device=out_mask.device)
            else:
                coords = point_coords[b].to(out_mask.device)[None]  # (1, P, 2)
            tgt_pts = point_sample(tgt_mask, coords.repeat(num_targets, 1, 1))[:, 0]  # (T, P)
            out_pts = point_sample(out_mask, coords.repeat(num_queries, 1, 1))[:, 0]  # (N, P)

            cost_mask = batch_sigmoid_ce_cost(out_pts, tgt_pts)
            cost_dice = batch_dice_cost(out_pts, tgt_pts)
            cost = (
                self.cost_class * cost_class
                + self.cost_mask * cost_mask
                + self.cost_dice * cost_dice
            )  # (N, T)
            costs.append(cost.cpu())
        return costs

    @torch.no_grad()
    def forward(
        self,
        outputs: dict,
        targets: list[dict],
        point_coords: list[torch.Tensor] | None = None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Match each image's predictions to its targets.

        Returns:
            per image ``(pred_idx, tgt_idx)`` int64 tensors of length min(N, T_i): prediction
            ``pred_idx[k]`` is assigned to target ``tgt_idx[k]``.
        """
        indices = []
        for cost in self.cost_matrices(outputs, targets, point_coords):
            if cost.shape[1] == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            cost_np = cost.numpy()
            if not np.isfinite(cost_np).all():
                raise FloatingPointError("matching cost is not finite (NaN/inf predictions?)")
            rows, cols = linear_sum_assignment(cost_np)
            indices.append(
                (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
            )
        return indices

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
            f"cost_dice={self.cost_dice}, num_points={self.num_points}"
        )
