"""SegCLIP's text-prompted masked-attention transformer decoder.

Pipeline (B images, N queries, K classes, C = hidden_dim):

1. TMP: the K class text embeddings (K, D) -> Q_text (B, N, C) + query positional embeddings.
2. (training with GTG) the classes present in each image -> guidance queries (B, T, C),
   appended after the N ordinary queries.
3. CFF over all queries (skipped -- but its parameters kept -- when ``cff_enabled`` is False).
4. ``dec_layers`` masked-attention layers (cross-attention, self-attention, FFN) over the three
   pixel-decoder maps round robin, coarsest first.
5. The shared prediction head after CFF and after every layer: class logits (B, Q, K+1) and
   mask logits (B, Q, H/4, W/4).

Attention masks (True = blocked):
* cross-attention of ordinary queries: the previous prediction's masks, resized bilinearly to the
  layer's map, blocked where sigmoid < 0.5; guidance queries use their class's ground-truth mask
  instead (area fraction > 0.5 on the map, or > 0 when that leaves nothing). A row that would be
  fully blocked is unblocked.
* self-attention (and CFF's): ordinary queries may not attend to the guidance group; padded
  guidance slots are blocked as keys. Guidance queries see the ordinary ones and each other.
So the ordinary queries' outputs do not depend on the guidance group at all.
"""

import logging

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d
from torch import nn

from .attention_layers import MLP, CrossAttentionLayer, FFNLayer, SelfAttentionLayer
from .cff import CrossModalFeatureFusion
from .class_heads import build_class_head
from .position_encoding import PositionEmbeddingSine
from .text_queries import TextQueryGenerator

logger = logging.getLogger(__name__)


def mask_logits(mask_embed: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """einsum("bqc,bchw->bqhw"): (B, Q, C) embeddings x (B, C, H, W) features -> (B, Q, H, W).

    Channels-last features (the CPU inference layout) are a (B, H*W, C) matrix in memory; one
    batched matmul against its transpose reads them in place, where einsum first copies them to
    NCHW (~3x slower in bf16 at 256 x 256 x 256).
    """
    b, c, h, w = features.shape
    if features.is_contiguous(memory_format=torch.channels_last):
        flat = features.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view
        return torch.bmm(mask_embed, flat.transpose(1, 2)).view(b, -1, h, w)
    return torch.einsum("bqc,bchw->bqhw", mask_embed, features)


def bilinear_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)``, computed exactly and
    much faster (same values up to float rounding) for even integer reductions of 4 or more.

    Reducing by an even factor f samples at f*i + f/2 - 1/2, midway between two pixels in each
    axis, so the result is the mean of four strided slices; the 2-D kernel instead reads a
    full-size NCHW map per output channel (~45 ms for 256 x 256 x 256 -> 32 x 32 here).
    """
    h, w = x.shape[-2:]
    oh, ow = int(size[0]), int(size[1])
    if (oh, ow) == (h, w):
        return x
    fy, fx = h // oh, w // ow
    if h != fy * oh or w != fx * ow or fy != fx or fy < 4 or fy % 2:
        return F.interpolate(x, size=(oh, ow), mode="bilinear", align_corners=False)
    o = fy // 2 - 1
    s = (
        x[..., o::fy, o::fy]
        + x[..., o + 1 :: fy, o::fy]
        + x[..., o::fy, o + 1 :: fy]
        + x[..., o + 1 :: fy, o + 1 :: fy]
    )
    return s * 0.25


def gt_masks_to_attention(
    masks: list[torch.Tensor], num_slots: int, size: tuple[int, int]
) -> torch.Tensor:
    """Ground-truth masks -> blocked positions of the guidance queries on one map.

    Args:
        masks: per image (T_i, H, W) bool/float masks at the padded image size.
        num_slots: T = max_i T_i.
        size: (h, w) of the map.
    Returns:
        (B, T, h, w) bool, True = blocked. A query keeps the cells its mask covers by more than
        half (area interpolation), or any cell it touches when that keeps none; padded slots
        (t >= T_i) are fully unblocked (their outputs are ignored by the loss).
    """
    b = len(masks)
    device = masks[0].device if b else None
    blocked = torch.zeros((b, num_slots, *size), dtype=torch.bool, device=device)
    for i, m in enumerate(masks):
        t = m.shape[0]
        if t == 0:
            continue
        frac = F.interpolate(m[None].float(), size=size, mode="area")[0]  # (T_i, h, w)
        keep = frac > 0.5
        small = ~keep.flatten(1).any(1)  # (T_i,) objects smaller than half a cell everywhere
        keep[small] = frac[small] > 0
        blocked[i, :t] = ~keep
    return blocked


class SegCLIPTransformerDecoder(nn.Module):
    """TMP + CFF + masked-attention decoder + prediction heads (+ GTG in training).

    ``forward(x, mask_features, text_embeddings, guidance=None)``:
        x: the pixel decoder's multi-scale maps [(B, C_in, h_l, w_l)], coarsest first.
        mask_features: (B, mask_dim, H/4, W/4).
        text_embeddings: (K, D) frozen class text embeddings of the current vocabulary.
        guidance: None, or {"classes": [(T_i,) int64], "masks": [(T_i, H, W) bool]} with the
            masks at the padded image size (training with GTG only).
    returns the criterion's outputs (interface C): "pred_logits" (B, N, K+1), "pred_masks"
    (B, N, H/4, W/4), "aux_outputs" (in training: the CFF prediction and every layer but the
    last; in eval: empty, since only the last prediction is used) and "guidance" (None, or the
    same for the guidance group plus "valid" (B, T)).
    """

    @configurable
    def __init__(
        self,
        in_channels: int,
        *,
        text_dim: int,
        num_classes: int,
        hidden_dim: int,
        num_queries: int,
        nheads: int,
        dim_feedforward: int,
        dec_layers: int,
        pre_norm: bool,
        mask_dim: int,
        dropout: float = 0.0,
        class_head: str = "linear",
        cff_enabled: bool = True,
        num_feature_levels: int = 3,
    ):
        super().__init__()
        if num_classes > num_queries:
            raise ValueError(
                f"NUM_QUERIES ({num_queries}) must be >= the number of classes ({num_classes}): "
                "TMP puts every class in its own query slot"
            )
        self.num_queries = num_queries
        self.num_classes = num_classes
        self.num_heads = nheads
        self.num_layers = dec_layers
        self.num_feature_levels = num_feature_levels
        self.cff_enabled = cff_enabled

        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.text_queries = TextQueryGenerator(text_dim, hidden_dim, num_queries)
        self.cff = CrossModalFeatureFusion(hidden_dim, nheads, dim_feedforward, dropout, pre_norm)

        self.transformer_self_attention_layers = nn.ModuleList()
        self.transformer_cross_attention_layers = nn.ModuleList()
        self.transformer_ffn_layers = nn.ModuleList()
        for _ in range(dec_layers):
            self.transformer_self_attention_layers.append(
                SelfAttentionLayer(hidden_dim, nheads, dropout, pre_norm)
            )
            self.transformer_cross_attention_layers.append(
                CrossAttentionLayer(hidden_dim, nheads, dropout, pre_norm)
            )
            self.transformer_ffn_layers.append(
                FFNLayer(hidden_dim, dim_feedforward, dropout, pre_norm)
            )

        self.level_embed = nn.Embedding(num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(num_feature_levels):
            if in_channels != hidden_dim:
                proj = Conv2d(in_channels, hidden_dim, kernel_size=1)
                weight_init.c2_xavier_fill(proj)
                self.input_proj.append(proj)
            else:
                self.input_proj.append(nn.Sequential())

        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.class_head = build_class_head(class_head, hidden_dim, num_classes, text_dim)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    @classmethod
    def from_config(cls, cfg, in_channels: int, text_dim: int, num_classes: int):
        s = cfg.MODEL.SEGCLIP
        return {
            "in_channels": in_channels,
            "text_dim": text_dim,
            "num_classes": num_classes,
            "hidden_dim": s.HIDDEN_DIM,
            "num_queries": s.NUM_QUERIES,
            "nheads": s.NHEADS,
            "dim_feedforward": s.DIM_FEEDFORWARD,
            "dec_layers": s.DEC_LAYERS,
            "pre_norm": s.PRE_NORM,
            "mask_dim": s.MASK_DIM,
            "dropout": s.DROPOUT,
            "class_head": s.CLASS_HEAD,
            "cff_enabled": s.CFF_ENABLED,
        }

    # ------------------------------------------------------------------ helpers
    def _predict(
        self,
        queries: torch.Tensor,
        mask_features: torch.Tensor,
        text_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Q, C) -> class logits (B, Q, K+1), mask logits (B, Q, H/4, W/4)."""
        x = self.decoder_norm(queries)
        logits = self.class_head(x, text_embeddings)
        mask_embed = self.mask_embed(x)  # (B, Q, mask_dim)
        return logits, mask_logits(mask_embed, mask_features)

    def _attention_masks_only(self, queries: torch.Tensor, features_at: torch.Tensor):
        """Mask logits (B, Q, h, w) of an intermediate prediction on the next layer's map.

        ``features_at`` is the mask features resized to that map. Bilinear resizing is linear per
        channel, so ``resize(einsum(E, F)) == einsum(E, resize(F))``: this equals resizing the
        stride-4 masks, at 1/4 to 1/64 of the cost.
        """
        mask_embed = self.mask_embed(self.decoder_norm(queries))  # (B, Q, mask_dim)
        return mask_logits(mask_embed, features_at)

    def _cross_attn_mask(
        self,
        pred_masks: torch.Tensor,
        size: tuple[int, int],
        guidance_blocked: torch.Tensor | None,
    ) -> torch.Tensor:
        """Blocked memory positions of every query on a map of ``size``.

        Args:
            pred_masks: (B, Q, H/4, W/4) mask logits of the previous prediction.
            guidance_blocked: (B, T, h, w) GT-mask blocking of the last T queries, or None.
        Returns:
            (B, Q, h * w) bool, True = blocked; fully blocked rows unblocked.
        """
        m = bilinear_resize(pred_masks, size)
        blocked = m < 0.0  # (B, Q, h, w): sigmoid(m) < 0.5
        if guidance_blocked is not None and guidance_blocked.shape[1] > 0:
            t = guidance_blocked.shape[1]
            blocked = torch.cat([blocked[:, :-t], guidance_blocked], 1)
        blocked = blocked.flatten(2)  # (B, Q, S)
        blocked = blocked & ~blocked.all(-1, keepdim=True)
        return blocked.detach()

    def _self_attn_mask(self, valid: torch.Tensor) -> torch.Tensor:
        """(B, T) valid guidance slots -> (B, N+T, N+T) bool, True = blocked."""
        b, t = valid.shape
        n = self.num_queries
        blocked = torch.zeros((b, n + t, n + t), dtype=torch.bool, device=valid.device)
        blocked[:, :n, n:] = True  # ordinary queries never see the guidance group
        blocked[:, :, n:] |= ~valid[:, None, :]  # padded guidance slots are no keys
        return blocked

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: list[torch.Tensor],
        mask_features: torch.Tensor,
        text_embeddings: torch.Tensor,
        guidance: dict | None = None,
    ) -> dict:
        if len(x) != self.num_feature_levels:
            raise ValueError(
                f"SegCLIPTransformerDecoder expects {self.num_feature_levels} feature maps, "
                f"got {len(x)}"
            )
        b = mask_features.shape[0]
        if any(f.shape[0] != b for f in x):
            raise ValueError(
                f"batch sizes differ: mask_features {b}, maps {[f.shape[0] for f in x]}"
            )
        if text_embeddings.dim() != 2:
            raise ValueError(f"text embeddings must be (K, D), got {tuple(text_embeddings.shape)}")

        # memory of every level: (B, S_l, C) + positional encoding (B, S_l, C)
        src, pos, sizes = [], [], []
        for lvl in range(self.num_feature_levels):
            sizes.append(tuple(x[lvl].shape[-2:]))
            pos.append(self.pe_layer(x[lvl]).flatten(2).transpose(1, 2))
            s = self.input_proj[lvl](x[lvl]).flatten(2).transpose(1, 2)
            src.append(s + self.level_embed.weight[lvl][None, None])

        queries, query_pos = self.text_queries(text_embeddings, b)  # (B, N, C) each
        valid = None
        guidance_blocked = [None] * self.num_feature_levels
        self_mask = None
        if guidance is not None:
            classes, gt_masks = guidance["classes"], guidance["masks"]
            if len(classes) != b or len(gt_masks) != b:
                raise ValueError(
                    f"guidance needs one entry per image: {b} images, {len(classes)} class "
                    f"lists, {len(gt_masks)} mask stacks"
                )
            for i, (c, m) in enumerate(zip(classes, gt_masks)):
                if m.dim() != 3 or m.shape[0] != c.numel():
                    raise ValueError(
                        f"guidance of image {i}: masks {tuple(m.shape)} do not match "
                        f"{c.numel()} classes"
                    )
            q_gt, pos_gt, valid = self.text_queries.guidance(text_embeddings, classes)
            queries = torch.cat([queries, q_gt], 1)  # (B, N+T, C)
            query_pos = torch.cat([query_pos, pos_gt], 1)
            t = valid.shape[1]
            if t > 0:
                self_mask = self._self_attn_mask(valid)
                guidance_blocked = [gt_masks_to_attention(gt_masks, t, sz) for sz in sizes]

        if self.cff_enabled:
            queries = self.cff(queries, query_pos, src[0], pos[0], self_attn_mask=self_mask)

        # Training predicts after CFF and after every layer (deep supervision). Inference needs
        # only the last prediction; the others just feed the next layer's attention mask and are
        # computed directly at that layer's resolution.
        full_predictions = self.training
        features_at = None
        if not full_predictions:
            features_at = [bilinear_resize(mask_features, sz) for sz in sizes]

        # Inference: the keys (memory + pos) of a level are shared by its layers, so they are
        # added once; under autocast keys and values are also cast to the compute dtype once
        # (each layer's F.linear would cast its own copy: two passes over up to S = H/8 * W/8
        # tokens per layer). Same values as the per-layer path.
        keys = [None] * self.num_feature_levels
        if not torch.is_grad_enabled():
            dev = mask_features.device.type
            low = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
            for lvl in range(self.num_feature_levels):
                keys[lvl] = src[lvl] + pos[lvl]
                if low is not None:
                    keys[lvl], src[lvl] = keys[lvl].to(low), src[lvl].to(low)

        pred_logits, pred_masks = [], []

        def predict_then_mask(queries: torch.Tensor, layer: int) -> torch.Tensor:
            nxt = layer % self.num_feature_levels
            if full_predictions or layer == self.num_layers:
                logits, masks = self._predict(queries, mask_features, text_embeddings)
                pred_logits.append(logits)
                pred_masks.append(masks)
                if layer == self.num_layers:
                    return None
            else:
                masks = self._attention_masks_only(queries, features_at[nxt])
            return self._cross_attn_mask(masks, sizes[nxt], guidance_blocked[nxt])

        attn_mask = predict_then_mask(queries, 0)
        for i in range(self.num_layers):
            lvl = i % self.num_feature_levels
            queries = self.transformer_cross_attention_layers[i](
                queries,
                src[lvl],
                memory_mask=attn_mask,
                pos=pos[lvl],
                query_pos=query_pos,
                memory_with_pos=keys[lvl],
            )
            queries = self.transformer_self_attention_layers[i](
                queries, attn_mask=self_mask, query_pos=query_pos
            )
            queries = self.transformer_ffn_layers[i](queries)
            attn_mask = predict_then_mask(queries, i + 1)

        n = self.num_queries
        out = self._pack([c[:, :n] for c in pred_logits], [m[:, :n] for m in pred_masks])
        out["guidance"] = None
        if valid is not None:
            out["guidance"] = self._pack(
                [c[:, n:] for c in pred_logits], [m[:, n:] for m in pred_masks]
            )
            out["guidance"]["valid"] = valid
        return out

    @staticmethod
    def _pack(logits: list[torch.Tensor], masks: list[torch.Tensor]) -> dict:
        return {
            "pred_logits": logits[-1],
            "pred_masks": masks[-1],
            "aux_outputs": [
                {"pred_logits": c, "pred_masks": m} for c, m in zip(logits[:-1], masks[:-1])
            ],
        }
