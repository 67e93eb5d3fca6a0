"""Point sampling for the matcher and the mask losses (PointRend-style).

Masks are compared on a set of points instead of on every pixel: coordinates are normalised to
``[0, 1] x [0, 1]`` as ``(x, y)`` over the full extent of a map, so one set of points reads a
prediction at stride 4 and a ground-truth mask at full resolution at the same image locations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def point_sample(inputs: torch.Tensor, point_coords: torch.Tensor, **kwargs) -> torch.Tensor:
    """Bilinearly read ``inputs`` at normalised points (``grid_sample``, align_corners=False).

    Args:
        inputs: (M, C, H, W) maps.
        point_coords: (M, P, 2) points as (x, y) in [0, 1].

    Returns:
        (M, C, P) values.
    """
    if point_coords.dim() != 3 or point_coords.shape[-1] != 2:
        raise ValueError(f"point_coords must be (M, P, 2), got {tuple(point_coords.shape)}")
    kwargs.setdefault("align_corners", False)
    grid = (2.0 * point_coords - 1.0).unsqueeze(2)  # (M, P, 1, 2) in [-1, 1]
    out = F.grid_sample(inputs, grid.to(inputs.dtype), **kwargs)  # (M, C, P, 1)
    return out.squeeze(3)


def calculate_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Uncertainty of binary mask logits: ``-|logit|`` (highest at the decision boundary).

    Args:
        logits: (M, 1, ...) logits.
    """
    return -torch.abs(logits)


def get_uncertain_point_coords_with_randomness(
    coarse_logits: torch.Tensor,
    uncertainty_func: Callable[[torch.Tensor], torch.Tensor],
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
) -> torch.Tensor:
    """Importance sampling: most points where the prediction is uncertain, the rest uniform.

    ``num_points * oversample_ratio`` candidates are drawn uniformly; the
    ``importance_sample_ratio * num_points`` most uncertain of them are kept and the remaining
    points are drawn uniformly again.

    Args:
        coarse_logits: (M, 1, h, w) mask logits (gradients are not needed).
        uncertainty_func: maps (M, 1, P) logits to (M, 1, P) uncertainty scores.

    Returns:
        (M, num_points, 2) coordinates (x, y) in [0, 1].
    """
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(
            f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}"
        )
    num_masks = coarse_logits.shape[0]
    device = coarse_logits.device
    num_sampled = int(num_points * oversample_ratio)
    point_coords = torch.rand(num_masks, num_sampled, 2, device=device)  # (M, S, 2)
    point_logits = point_sample(coarse_logits, point_coords)  # (M, 1, S)
    uncertainties = uncertainty_func(point_logits)  # (M, 1, S)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    idx = torch.topk(uncertainties[:, 0, :], k=num_uncertain, dim=1)[1]  # (M, U)
    coords = torch.gather(point_coords, 1, idx.unsqueeze(-1).expand(-1, -1, 2))  # (M, U, 2)
    if num_random > 0:
        coords = torch.cat([coords, torch.rand(num_masks, num_random, 2, device=device)], dim=1)
    return coords
