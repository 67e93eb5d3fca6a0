"""Sine positional encoding of 2-D feature maps (the "Attention is all you need" encoding
generalised to images, as used by DETR and Mask2Former)."""

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """Fixed sine/cosine encoding of (y, x) positions.

    Args:
        num_pos_feats: channels per axis; the output has ``2 * num_pos_feats`` channels
            (y first, then x).
        temperature: frequency base.
        normalize: scale coordinates to ``[0, scale]`` over the valid (unpadded) extent.
        scale: the normalised range (default ``2 * pi``).
    """

    def __init__(
        self,
        num_pos_feats: int = 64,
        temperature: float = 10000.0,
        normalize: bool = False,
        scale: float | None = None,
    ):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: `scale` is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            x: (B, C, H, W) feature map (only its shape, device and dtype are used).
            mask: (B, H, W) bool, True at padded positions, or None (no padding).

        Returns:
            (B, 2 * num_pos_feats, H, W) encoding in ``x``'s dtype.
        """
        b, _, h, w = x.shape
        if mask is None:
            not_mask = torch.ones((b, h, w), device=x.device, dtype=torch.float32)
        else:
            if mask.shape != (b, h, w):
                raise ValueError(
                    f"PositionEmbeddingSine: mask shape {tuple(mask.shape)} != {(b, h, w)}"
                )
            not_mask = (~mask).to(torch.float32)
        y_embed = not_mask.cumsum(1)  # (B, H, W), 1..H
        x_embed = not_mask.cumsum(2)
        if self.normalize:
            eps = 1e-6
            y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + eps) * self.scale

        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (
            2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats
        )

        pos_x = x_embed[:, :, :, None] / dim_t  # (B, H, W, F)
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4)
        pos = torch.cat((pos_y.flatten(3), pos_x.flatten(3)), dim=3).permute(0, 3, 1, 2)
        return pos.to(x.dtype)  # (B, 2F, H, W)
