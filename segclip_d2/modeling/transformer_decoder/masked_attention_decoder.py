"""Mask2Former's masked-attention transformer decoder, the part SegCLIP's decoder builds on.

Pipeline (B images, Q queries, K classes, C = hidden_dim):

1. memory preparation: each of the three pixel-decoder maps -> values (B, S_l, C) (projection +
   level embedding), sine positional encoding (B, S_l, C) and keys = values + encoding;
2. initial queries (B, Q, C) and their positional embeddings (subclasses: learnable queries in
   :class:`Mask2FormerTransformerDecoder`, text queries + GTG + CFF in SegCLIP's);
3. the layer loop: ``dec_layers`` masked-attention layers (cross-attention, self-attention, FFN)
   over the maps round robin, coarsest first;
4. the shared prediction heads after step 2 and after every layer: class logits (B, Q, K+1) and
   mask logits (B, Q, H/4, W/4).

Cross-attention masks (True = blocked): the previous prediction's masks resized bilinearly to the
layer's map, blocked where sigmoid < 0.5; a row that would be fully blocked is unblocked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d
from torch import nn

from .attention_layers import MLP, CrossAttentionLayer, FFNLayer, SelfAttentionLayer
from .build import TRANSFORMER_DECODER_REGISTRY
from .class_heads import TextClassHead, build_class_head
from .position_encoding import PositionEmbeddingSine

logger = logging.getLogger(__name__)


@dataclass
class Memory:
    """The decoder's view of the pixel-decoder maps, per level l (coarsest first)."""

    values: list[torch.Tensor]  # (B, S_l, C): projected map + level embedding
    pos: list[torch.Tensor]  # (B, S_l, C): sine positional encoding
    keys: list[torch.Tensor]  # (B, S_l, C): values + pos (shared by the layers of a level)
    sizes: list[tuple[int, int]]  # (h_l, w_l)


@dataclass
class QueryGroups:
    """Initial queries and what the attention needs to know about their groups.

    ``num_extra`` queries after the first ``num_queries`` form a group (SegCLIP's GTG) with its
    own cross-attention blocking per level and a self-attention mask.
    """

    queries: torch.Tensor  # (B, Q, C)
    query_pos: torch.Tensor  # (B, Q, C)
    self_mask: torch.Tensor | None = None  # (B, Q, Q) bool, True = blocked
    extra_blocked: list = field(default_factory=list)  # per level (B, T, h, w) bool, or []
    valid: torch.Tensor | None = None  # (B, T) bool: real slots of the extra group


class MaskedAttentionDecoder(nn.Module):
    """Masked-attention layers + prediction heads over given initial queries (abstract: a
    subclass defines :meth:`initial_queries`).

    ``forward(x, mask_features, text_embeddings, guidance=None)``:
        x: the pixel decoder's multi-scale maps [(B, C_in, h_l, w_l)], coarsest first.
        mask_features: (B, mask_dim, H/4, W/4).
        text_embeddings: (K, D) class text embeddings of the current vocabulary; may be None
            when the decoder reads no text (:attr:`needs_text` False).
        guidance: subclass-specific (SegCLIP's GTG), None otherwise.
    returns "pred_logits" (B, N, K+1), "pred_masks" (B, N, H/4, W/4), "aux_outputs" (in
    training: the initial prediction and every layer but the last, for deep supervision; in
    eval: empty) and "guidance" (None, or the same for the extra group plus "valid" (B, T)).
    """

    #: Whether ``forward`` accepts a ``guidance`` group (SegCLIP's GTG).
    supports_guidance = False

    def __init__(
        self,
        in_channels: int,
        *,
        text_dim: int,
        num_train_classes: int,
        hidden_dim: int,
        num_queries: int,
        nheads: int,
        dim_feedforward: int,
        dec_layers: int,
        pre_norm: bool,
        mask_dim: int,
        dropout: float = 0.0,
        class_head: str = "linear",
        num_feature_levels: int = 3,
    ):
        super().__init__()
        self.num_queries = num_queries
        self.num_train_classes = num_train_classes
        self.num_heads = nheads
        self.num_layers = dec_layers
        self.num_feature_levels = num_feature_levels
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads, dropout, pre_norm) for _ in range(dec_layers)
        )
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads, dropout, pre_norm) for _ in range(dec_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward, dropout, pre_norm) for _ in range(dec_layers)
        )
        self.level_embed = nn.Embedding(num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList(
            _input_projection(in_channels, hidden_dim) for _ in range(num_feature_levels)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.class_head = build_class_head(class_head, hidden_dim, num_train_classes, text_dim)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    @staticmethod
    def config_args(cfg, in_channels: int, text_dim: int, num_train_classes: int) -> dict:
        """The constructor arguments every decoder reads from ``cfg.MODEL.SEGCLIP``."""
        s = cfg.MODEL.SEGCLIP
        return {
            "in_channels": in_channels,
            "text_dim": text_dim,
            "num_train_classes": num_train_classes,
            "hidden_dim": s.HIDDEN_DIM,
            "num_queries": s.NUM_QUERIES,
            "nheads": s.NHEADS,
            "dim_feedforward": s.DIM_FEEDFORWARD,
            "dec_layers": s.DEC_LAYERS,
            "pre_norm": s.PRE_NORM,
            "mask_dim": s.MASK_DIM,
            "dropout": s.DROPOUT,
            "class_head": s.CLASS_HEAD,
        }

    def check_vocabulary(self, num_classes: int) -> None:
        """Raise ValueError when this decoder cannot predict ``num_classes`` classes."""

    @property
    def needs_text(self) -> bool:
        """Whether ``forward`` reads the class text embeddings (here: the text class head)."""
        return isinstance(self.class_head, TextClassHead)

    # ------------------------------------------------------------------ steps
    def forward(
        self,
        x: list[torch.Tensor],
        mask_features: torch.Tensor,
        text_embeddings: torch.Tensor,
        guidance: dict | None = None,
    ) -> dict:
        self._check_inputs(x, mask_features, text_embeddings)
        memory = self.prepare_memory(x)
        groups = self.initial_queries(text_embeddings, memory, guidance)
        predictions = self.layer_loop(groups, memory, mask_features, text_embeddings)
        return self.pack_outputs(predictions, groups)

    def _check_inputs(self, x, mask_features, text_embeddings) -> None:
        if len(x) != self.num_feature_levels:
            raise ValueError(
                f"{type(self).__name__} expects {self.num_feature_levels} feature maps, "
                f"got {len(x)}"
            )
        b = mask_features.shape[0]
        if any(f.shape[0] != b for f in x):
            raise ValueError(
                f"batch sizes differ: mask_features {b}, maps {[f.shape[0] for f in x]}"
            )
        if text_embeddings is None:
            if self.needs_text:
                raise ValueError(f"{type(self).__name__} needs the class text embeddings")
        elif text_embeddings.dim() != 2:
            raise ValueError(f"text embeddings must be (K, D), got {tuple(text_embeddings.shape)}")

    def prepare_memory(self, x: list[torch.Tensor]) -> Memory:
        """Step 1: values, positional encodings and keys of every level."""
        values, pos, keys, sizes = [], [], [], []
        for lvl, feat in enumerate(x):
            sizes.append(tuple(feat.shape[-2:]))
            p = self.pe_layer(feat).flatten(2).transpose(1, 2)  # (B, S_l, C)
            v = self.input_proj[lvl](feat).flatten(2).transpose(1, 2)
            v = v + self.level_embed.weight[lvl][None, None]
            values.append(v)
            pos.append(p)
            keys.append(v + p)
        return Memory(values, pos, keys, sizes)

    def initial_queries(
        self, text_embeddings: torch.Tensor, memory: Memory, guidance: dict | None
    ) -> QueryGroups:
        """Step 2 (subclasses): the queries entering the first layer."""
        raise NotImplementedError

    def layer_loop(
        self,
        groups: QueryGroups,
        memory: Memory,
        mask_features: torch.Tensor,
        text_embeddings: torch.Tensor | None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Step 3: the masked-attention layers; returns the (logits, masks) prediction made
        before the first layer and after every layer."""
        queries, query_pos = groups.queries, groups.query_pos
        predictions = []
        step = (groups, memory, mask_features, text_embeddings, predictions)
        attn_mask = self.predict_then_mask(queries, 0, *step)
        for i in range(self.num_layers):
            lvl = i % self.num_feature_levels
            queries = self.transformer_cross_attention_layers[i](
                queries,
                memory.values[lvl],
                memory_mask=attn_mask,
                query_pos=query_pos,
                memory_with_pos=memory.keys[lvl],
            )
            queries = self.transformer_self_attention_layers[i](
                queries, attn_mask=groups.self_mask, query_pos=query_pos
            )
            queries = self.transformer_ffn_layers[i](queries)
            attn_mask = self.predict_then_mask(queries, i + 1, *step)
        return predictions

    def predict_then_mask(self, queries, layer, groups, memory, mask_features, text, predictions):
        """Step 4 after ``layer`` layers: predict (appended to ``predictions``), then the next
        layer's cross-attention mask (None after the last layer)."""
        logits, masks = self.predict(queries, mask_features, text)
        predictions.append((logits, masks))
        if layer == self.num_layers:
            return None
        nxt = layer % self.num_feature_levels
        blocked = groups.extra_blocked[nxt] if groups.extra_blocked else None
        return self.cross_attn_mask(masks, memory.sizes[nxt], blocked)

    def predict(self, queries, mask_features, text_embeddings):
        """The prediction heads: (B, Q, C) -> class logits (B, Q, K+1), mask logits
        (B, Q, H/4, W/4)."""
        x = self.decoder_norm(queries)
        logits = self.class_head(x, text_embeddings)
        mask_embed = self.mask_embed(x)  # (B, Q, mask_dim)
        return logits, torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)

    @staticmethod
    def cross_attn_mask(pred_masks, size, extra_blocked):
        """Blocked memory positions of every query on a map of ``size``.

        Args:
            pred_masks: (B, Q, h', w') mask logits of the previous prediction.
            extra_blocked: (B, T, h, w) blocking of the last T queries (GTG), or None.
        Returns:
            (B, Q, h * w) bool, True = blocked; fully blocked rows unblocked.
        """
        resized = F.interpolate(pred_masks, size=size, mode="bilinear", align_corners=False)
        blocked = resized < 0.0  # (B, Q, h, w): sigmoid < 0.5
        if extra_blocked is not None and extra_blocked.shape[1] > 0:
            t = extra_blocked.shape[1]
            blocked = torch.cat([blocked[:, :-t], extra_blocked], 1)
        blocked = blocked.flatten(2)  # (B, Q, S)
        blocked = blocked & ~blocked.all(-1, keepdim=True)
        return blocked.detach()

    def pack_outputs(self, predictions, groups: QueryGroups) -> dict:
        """The criterion's outputs: ordinary queries, and the extra group under "guidance"."""
        n = self.num_queries
        if not self.training:  # the intermediate predictions serve deep supervision only
            predictions = predictions[-1:]
        logits = [c for c, _ in predictions]
        masks = [m for _, m in predictions]
        out = _pack([c[:, :n] for c in logits], [m[:, :n] for m in masks])
        out["guidance"] = None
        if groups.valid is not None:
            out["guidance"] = _pack([c[:, n:] for c in logits], [m[:, n:] for m in masks])
            out["guidance"]["valid"] = groups.valid
        return out


def _pack(logits: list[torch.Tensor], masks: list[torch.Tensor]) -> dict:
    return {
        "pred_logits": logits[-1],
        "pred_masks": masks[-1],
        "aux_outputs": [
            {"pred_logits": c, "pred_masks": m} for c, m in zip(logits[:-1], masks[:-1])
        ],
    }


def _input_projection(in_channels: int, hidden_dim: int) -> nn.Module:
    if in_channels == hidden_dim:
        return nn.Sequential()
    proj = Conv2d(in_channels, hidden_dim, kernel_size=1)
    weight_init.c2_xavier_fill(proj)
    return proj


@TRANSFORMER_DECODER_REGISTRY.register()
class Mask2FormerTransformerDecoder(MaskedAttentionDecoder):
    """Mask2Former's decoder with ``num_queries`` learnable queries: SegCLIP without text
    queries, CFF and GTG (the "no text queries" ablation). The class head is still chosen by
    ``MODEL.SEGCLIP.CLASS_HEAD``; the text embeddings reach only a "text" class head (with the
    linear one the model builds no text encoder)."""

    @configurable
    def __init__(self, in_channels: int, **kwargs):
        super().__init__(in_channels, **kwargs)
        hidden_dim = self.decoder_norm.normalized_shape[0]
        self.query_feat = nn.Embedding(self.num_queries, hidden_dim)  # learnable features
        self.query_embed = nn.Embedding(self.num_queries, hidden_dim)  # learnable positions

    @classmethod
    def from_config(cls, cfg, in_channels: int, text_dim: int, num_train_classes: int):
        return cls.config_args(cfg, in_channels, text_dim, num_train_classes)

    def initial_queries(self, text_embeddings, memory, guidance) -> QueryGroups:
        if guidance is not None:
            raise ValueError(
                "Mask2FormerTransformerDecoder has no text queries, so ground-truth text "
                "guidance does not apply: set MODEL.SEGCLIP.GT_GUIDANCE.ENABLED False"
            )
        b = memory.values[0].shape[0]
        queries = self.query_feat.weight[None].expand(b, -1, -1)  # (B, N, C)
        return QueryGroups(queries, self.query_embed.weight[None].expand(b, -1, -1))
