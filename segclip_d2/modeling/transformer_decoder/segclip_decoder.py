"""SegCLIP's text-prompted masked-attention transformer decoder (Mask2Former's layers, see
:mod:`.masked_attention_decoder`, with TMP text queries, GTG and CFF as the initial queries).

Pipeline (B images, N queries, K classes, C = hidden_dim):

1. TMP: the K class text embeddings (K, D) -> Q_text (B, N, C) + query positional embeddings.
2. (training with GTG) the classes present in each image -> guidance queries (B, T, C),
   appended after the N ordinary queries.
3. CFF over all queries (not built when ``cff_enabled`` is False).
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

import torch
import torch.nn.functional as F
from detectron2.config import configurable

from .build import TRANSFORMER_DECODER_REGISTRY
from .cff import CrossModalFeatureFusion
from .masked_attention_decoder import MaskedAttentionDecoder, Memory, QueryGroups
from .text_queries import TextQueryGenerator, check_query_slots

logger = logging.getLogger(__name__)


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


@TRANSFORMER_DECODER_REGISTRY.register()
class SegCLIPTransformerDecoder(MaskedAttentionDecoder):
    """TMP + CFF + masked-attention decoder + prediction heads (+ GTG in training).

    ``forward(x, mask_features, text_embeddings, guidance=None)`` as
    :class:`MaskedAttentionDecoder`, with
        text_embeddings: (K, D) frozen class text embeddings of the current vocabulary, K <= N.
        guidance: None, or {"classes": [(T_i,) int64], "masks": [(T_i, H, W) bool]} with the
            masks at the padded image size (training with GTG only).
    Outputs as :class:`MaskedAttentionDecoder`; "aux_outputs" starts with the CFF prediction.
    """

    supports_guidance = True

    @configurable
    def __init__(self, in_channels: int, *, cff_enabled: bool = True, **kwargs):
        super().__init__(in_channels, **kwargs)
        check_query_slots(self.num_train_classes, self.num_queries)
        hidden_dim = self.decoder_norm.normalized_shape[0]
        text_dim = kwargs["text_dim"]
        self.text_queries = TextQueryGenerator(text_dim, hidden_dim, self.num_queries)
        self.cff = None
        if cff_enabled:
            self.cff = CrossModalFeatureFusion(
                hidden_dim,
                kwargs["nheads"],
                kwargs["dim_feedforward"],
                kwargs.get("dropout", 0.0),
                kwargs["pre_norm"],
            )

    @classmethod
    def from_config(cls, cfg, in_channels: int, text_dim: int, num_train_classes: int):
        args = cls.config_args(cfg, in_channels, text_dim, num_train_classes)
        args["cff_enabled"] = cfg.MODEL.SEGCLIP.CFF_ENABLED
        return args

    @property
    def cff_enabled(self) -> bool:
        return self.cff is not None

    @property
    def needs_text(self) -> bool:
        return True  # the text queries

    def check_vocabulary(self, num_classes: int) -> None:
        check_query_slots(num_classes, self.num_queries)

    def initial_queries(self, text_embeddings, memory: Memory, guidance) -> QueryGroups:
        """TMP queries, then (with ``guidance``) the GTG group, then CFF over all of them."""
        b = memory.values[0].shape[0]
        queries, query_pos = self.text_queries(text_embeddings, b)  # (B, N, C) each
        groups = QueryGroups(queries, query_pos)
        if guidance is not None:
            groups = self.guidance_group(groups, text_embeddings, guidance, memory.sizes)
        if self.cff is not None:
            groups.queries = self.cff(
                groups.queries,
                groups.query_pos,
                memory.values[0],
                memory.pos[0],
                self_attn_mask=groups.self_mask,
                memory_key=memory.keys[0],
            )
        return groups

    def guidance_group(
        self, groups: QueryGroups, text_embeddings, guidance: dict, sizes
    ) -> QueryGroups:
        """GTG: append the guidance queries of each image's ground-truth classes, with their
        self-attention isolation and their ground-truth cross-attention masks."""
        b = groups.queries.shape[0]
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
        groups = QueryGroups(
            torch.cat([groups.queries, q_gt], 1),  # (B, N+T, C)
            torch.cat([groups.query_pos, pos_gt], 1),
            valid=valid,
        )
        t = valid.shape[1]
        if t > 0:
            groups.self_mask = self._self_attn_mask(valid)
            groups.extra_blocked = [gt_masks_to_attention(gt_masks, t, sz) for sz in sizes]
        return groups

    def _self_attn_mask(self, valid: torch.Tensor) -> torch.Tensor:
        """(B, T) valid guidance slots -> (B, N+T, N+T) bool, True = blocked."""
        b, t = valid.shape
        n = self.num_queries
        blocked = torch.zeros((b, n + t, n + t), dtype=torch.bool, device=valid.device)
        blocked[:, :n, n:] = True  # ordinary queries never see the guidance group
        blocked[:, :, n:] |= ~valid[:, None, :]  # padded guidance slots are no keys
        return blocked
