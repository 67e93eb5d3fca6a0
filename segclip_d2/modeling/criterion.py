"""SegCLIP's training losses: Mask2Former's set criterion plus the ground-truth guidance group.

Interface (C in the project brief)::

    outputs = {
        "pred_logits": (B, N, K+1), "pred_masks": (B, N, h, w) mask logits (stride 4),
        "aux_outputs": [{"pred_logits", "pred_masks"}, ...],   # CFF + every layer but the last
        "guidance": None or {"pred_logits": (B, T, K+1), "pred_masks": (B, T, h, w),
                             "aux_outputs": [...], "valid": (B, T) bool},
    }
    targets = [{"labels": (T_i,) int64, "masks": (T_i, H, W) bool/float}, ...]

``SetCriterion.forward(outputs, targets)`` returns the ALREADY WEIGHTED losses: ``loss_ce``,
``loss_mask``, ``loss_dice``, ``loss_ce_<i>`` ... for the auxiliary predictions and
``loss_gtg_ce``, ``loss_gtg_mask``, ``loss_gtg_dice``, ``loss_gtg_ce_<i>`` ... for the guidance
group (times ``GT_GUIDANCE.LOSS_WEIGHT``).

Normalisation is global over the batch of all processes, so training on P processes with B/P
images each computes the same loss (and gradients) as one process with B images:

- class CE: sum of per-query weighted CE divided by the sum of weights (like
  ``F.cross_entropy(weight=...)`` with mean reduction, with the no-object weight
  ``NO_OBJECT_WEIGHT``), the sum of weights taken over all processes;
- mask BCE and dice: summed over matched masks and divided by the average number of target
  masks per process (Mask2Former's ``num_masks``).

Everything here (matching, point sampling, the losses and their reductions) runs in float32
with autocast disabled, as in Mask2Former: under fp16 AMP, sums over thousands of points can pass
fp16's 65,504. The predictions are cast up; gradients flow back to their reduced precision.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.utils import comm
from torch import nn

from .matcher import HungarianMatcher
from .point_sampling import (
    calculate_uncertainty,
    get_uncertain_point_coords_with_randomness,
    point_sample,
)


def dice_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Dice loss summed over masks / num_masks. inputs (M, P) logits, targets (M, P)."""
    probs = inputs.sigmoid()
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    loss = 1 - (numerator + 1) / (denominator + 1)
    return loss.sum() / num_masks


def sigmoid_ce_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """BCE averaged over points, summed over masks / num_masks. inputs (M, P) logits."""
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


class SetCriterion(nn.Module):
    """Class CE + mask BCE + mask dice on matched (or, for guidance, fixed-assigned) pairs.

    Args:
        num_classes: K (the no-object class is index K).
        matcher: assigns predictions to targets.
        class_weight, mask_weight, dice_weight: loss weights.
        no_object_weight: classification weight of the no-object class.
        num_points: points per mask for the BCE and dice losses.
        oversample_ratio, importance_sample_ratio: importance sampling of those points.
        deep_supervision: also apply the losses to ``aux_outputs``.
        guidance_weight: multiplier of every guidance-group loss.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        deep_supervision: bool = True,
        guidance_weight: float = 1.0,
    ):
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.base_weights = {"ce": class_weight, "mask": mask_weight, "dice": dice_weight}
        self.no_object_weight = no_object_weight
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.deep_supervision = deep_supervision
        self.guidance_weight = guidance_weight
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = no_object_weight
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    # ------------------------------------------------------------------ normalisation
    def _global_normalizers(
        self, outputs: dict, targets: list[dict], device: torch.device
    ) -> dict[str, float]:
        """Per-process averages of the loss denominators (one all_reduce for all of them)."""
        bs, num_queries = outputs["pred_logits"].shape[:2]
        counts = [int(t["labels"].numel()) for t in targets]
        num_masks = sum(counts)
        num_matched = sum(min(num_queries, c) for c in counts)
        # Sum of CE weights over all queries: matched ones weigh 1, the rest no_object_weight.
        ce_weight = num_matched + self.no_object_weight * (bs * num_queries - num_matched)
        guidance = outputs.get("guidance")
        num_guided = int(guidance["valid"].sum()) if guidance is not None else 0
        stats = torch.tensor(
            [num_masks, ce_weight, num_guided, num_guided], dtype=torch.float64, device=device
        )
        world = comm.get_world_size()
        if world > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
            stats /= world
        num_masks_avg, ce_avg, guided_avg, _ = stats.tolist()
        return {
            "num_masks": max(num_masks_avg, 1.0),
            "ce": max(ce_avg, 1e-6),
            "guided_masks": max(guided_avg, 1.0),
            "guided_ce": max(guided_avg, 1e-6),
        }

    # ------------------------------------------------------------------ losses
    def loss_labels(
        self, pred_logits: torch.Tensor, target_classes: torch.Tensor, normalizer: float
    ) -> torch.Tensor:
        """Weighted CE. pred_logits (B, Q, K+1); target_classes (B, Q), -1 = not scored."""
        logits = pred_logits.float()
        ce = F.cross_entropy(
            logits.transpose(1, 2),
            target_classes,
            weight=self.empty_weight.to(logits),
            ignore_index=-1,
            reduction="none",
        )  # (B, Q), already multiplied by the class weight
        return ce.sum() / normalizer

    def loss_masks(
        self,
        pred_masks: torch.Tensor,
        targets: list[dict],
        indices: list[tuple[torch.Tensor, torch.Tensor]],
        num_masks: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """BCE and dice on importance-sampled points of the assigned (pred, target) pairs."""
        src, tgt = [], []
        for b, (src_idx, tgt_idx) in enumerate(indices):
            if src_idx.numel() == 0:
                continue
            src.append(pred_masks[b, src_idx.to(pred_masks.device)])  # (M_b, h, w)
            tgt.append(targets[b]["masks"][tgt_idx.to(targets[b]["masks"].device)])  # (M_b, H, W)
        if not src:
            # No target mask anywhere: zero, but connected to the graph (DDP needs every
            # parameter that produced pred_masks to receive a gradient).
            zero = pred_masks.float().sum() * 0.0
            return zero, zero.clone()
        src_masks = torch.cat(src).float()[:, None]  # (M, 1, h, w)
        with torch.no_grad():
            coords = get_uncertain_point_coords_with_randomness(
                src_masks,
                calculate_uncertainty,
                self.num_points,
                self.oversample_ratio,
                self.importance_sample_ratio,
            )  # (M, P, 2)
            labels = []
            start = 0
            for t in tgt:  # targets of different images may have different sizes
                n = t.shape[0]
                t = t.to(device=src_masks.device, dtype=src_masks.dtype)[:, None]
                labels.append(point_sample(t, coords[start : start + n])[:, 0])
                start += n
            point_labels = torch.cat(labels)  # (M, P)
        point_logits = point_sample(src_masks, coords)[:, 0]  # (M, P)
        return (
            sigmoid_ce_loss(point_logits, point_labels, num_masks),
            dice_loss(point_logits, point_labels, num_masks),
        )

    def _group_losses(
        self,
        pred: dict,
        targets: list[dict],
        indices: list[tuple[torch.Tensor, torch.Tensor]],
        target_classes: torch.Tensor,
        ce_normalizer: float,
        num_masks: float,
        prefix: str,
        suffix: str,
        scale: float,
    ) -> dict[str, torch.Tensor]:
        loss_ce = self.loss_labels(pred["pred_logits"], target_classes, ce_normalizer)
        loss_mask, loss_dice = self.loss_masks(pred["pred_masks"], targets, indices, num_masks)
        w = self.base_weights
        return {
            f"loss_{prefix}ce{suffix}": loss_ce * (w["ce"] * scale),
            f"loss_{prefix}mask{suffix}": loss_mask * (w["mask"] * scale),
            f"loss_{prefix}dice{suffix}": loss_dice * (w["dice"] * scale),
        }

    def _matched_classes(
        self, pred_logits: torch.Tensor, targets: list[dict], indices: list
    ) -> torch.Tensor:
        """(B, Q) class targets: matched queries get their target's class, others no-object."""
        bs, num_queries = pred_logits.shape[:2]
        target_classes = torch.full(
            (bs, num_queries), self.num_classes, dtype=torch.int64, device=pred_logits.device
        )
        for b, (src_idx, tgt_idx) in enumerate(indices):
            if src_idx.numel():
                labels = targets[b]["labels"].to(pred_logits.device)
                target_classes[b, src_idx.to(pred_logits.device)] = labels[
                    tgt_idx.to(pred_logits.device)
                ]
        return target_classes

    def _matched_group(self, pred: dict, targets, norms, suffix: str) -> dict:
        indices = self.matcher(pred, targets)
        target_classes = self._matched_classes(pred["pred_logits"], targets, indices)
        return self._group_losses(
            pred, targets, indices, target_classes, norms["ce"], norms["num_masks"], "", suffix, 1.0
        )

    @staticmethod
    def guidance_indices(
        valid: torch.Tensor, targets: list[dict]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed assignment: guidance query j of image i <-> target j of image i (valid slots)."""
        indices = []
        for b, t in enumerate(targets):
            num_targets = int(t["labels"].numel())
            num_valid = int(valid[b].sum())
            if num_valid != num_targets or not bool(valid[b, :num_valid].all()):
                raise ValueError(
                    f"guidance group of image {b}: 'valid' must mark the first T_i={num_targets} "
                    f"slots, got {valid[b].tolist()}"
                )
            idx = torch.arange(num_targets, dtype=torch.int64)
            indices.append((idx, idx.clone()))
        return indices

    def _guidance_group(self, guidance: dict, targets, norms, suffix: str) -> dict:
        pred_logits = guidance["pred_logits"]  # (B, T, K+1)
        valid = guidance["valid"].to(pred_logits.device)  # (B, T)
        indices = self.guidance_indices(valid, targets)
        # Padding slots (valid False) are not scored at all.
        target_classes = torch.full(
            valid.shape, -1, dtype=torch.int64, device=pred_logits.device
        )  # (B, T)
        for b, t in enumerate(targets):
            n = int(t["labels"].numel())
            target_classes[b, :n] = t["labels"].to(pred_logits.device)
        return self._group_losses(
            guidance,
            targets,
            indices,
            target_classes,
            norms["guided_ce"],
            norms["guided_masks"],
            "gtg_",
            suffix,
            self.guidance_weight,
        )

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Weighted losses of the final, auxiliary and guidance predictions (see module doc)."""
        pred_logits = outputs["pred_logits"]
        if pred_logits.dim() != 3 or pred_logits.shape[-1] != self.num_classes + 1:
            raise ValueError(
                f"pred_logits must be (B, N, {self.num_classes + 1}), "
                f"got {tuple(pred_logits.shape)}"
            )
        if len(targets) != pred_logits.shape[0]:
            raise ValueError(f"{pred_logits.shape[0]} images but {len(targets)} targets")
        with torch.autocast(device_type=pred_logits.device.type, enabled=False):
            return self._losses(outputs, targets)

    def _losses(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        norms = self._global_normalizers(outputs, targets, outputs["pred_logits"].device)
        losses = self._matched_group(outputs, targets, norms, "")
        if self.deep_supervision:
            for i, aux in enumerate(outputs.get("aux_outputs") or []):
                losses.update(self._matched_group(aux, targets, norms, f"_{i}"))

        guidance = outputs.get("guidance")
        if guidance is not None:
            losses.update(self._guidance_group(guidance, targets, norms, ""))
            if self.deep_supervision:
                for i, aux in enumerate(guidance.get("aux_outputs") or []):
                    aux = dict(aux, valid=guidance["valid"])
                    losses.update(self._guidance_group(aux, targets, norms, f"_{i}"))
        return losses

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, weights={self.base_weights}, "
            f"no_object_weight={self.no_object_weight}, num_points={self.num_points}, "
            f"oversample_ratio={self.oversample_ratio}, "
            f"importance_sample_ratio={self.importance_sample_ratio}, "
            f"deep_supervision={self.deep_supervision}, guidance_weight={self.guidance_weight}"
        )


def build_criterion(cfg, num_classes: int) -> SetCriterion:
    """The matcher and criterion configured by ``MODEL.SEGCLIP.LOSS`` and ``GT_GUIDANCE``."""
    loss = cfg.MODEL.SEGCLIP.LOSS
    matcher = HungarianMatcher(
        cost_class=loss.CLASS_WEIGHT,
        cost_mask=loss.MASK_WEIGHT,
        cost_dice=loss.DICE_WEIGHT,
        num_points=loss.TRAIN_NUM_POINTS,
    )
    return SetCriterion(
        num_classes,
        matcher,
        class_weight=loss.CLASS_WEIGHT,
        mask_weight=loss.MASK_WEIGHT,
        dice_weight=loss.DICE_WEIGHT,
        no_object_weight=loss.NO_OBJECT_WEIGHT,
        num_points=loss.TRAIN_NUM_POINTS,
        oversample_ratio=loss.OVERSAMPLE_RATIO,
        importance_sample_ratio=loss.IMPORTANCE_SAMPLE_RATIO,
        deep_supervision=loss.DEEP_SUPERVISION,
        guidance_weight=cfg.MODEL.SEGCLIP.GT_GUIDANCE.LOSS_WEIGHT,
    )
