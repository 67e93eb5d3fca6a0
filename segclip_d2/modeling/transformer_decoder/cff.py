"""CFF (Cross-modal Feature Fusion): aligns the text queries with the image before decoding."""

import torch
from torch import nn

from .attention_layers import CrossAttentionLayer, FFNLayer, SelfAttentionLayer


class CrossModalFeatureFusion(nn.Module):
    """Self-attention over the text queries, cross-attention from them to the coarsest (stride-32)
    pixel-decoder map, then an FFN; each step with residual + LayerNorm.

    The self-attention lets every slot (the blank ones too) take in what the class slots carry;
    the cross-attention aligns the prompts with this image. The output is the decoder's initial
    query features.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int,
        dropout: float = 0.0,
        normalize_before: bool = False,
    ):
        super().__init__()
        self.self_attn = SelfAttentionLayer(d_model, nhead, dropout, normalize_before)
        self.cross_attn = CrossAttentionLayer(d_model, nhead, dropout, normalize_before)
        self.ffn = FFNLayer(d_model, dim_feedforward, dropout, normalize_before)

    def forward(
        self,
        queries: torch.Tensor,
        query_pos: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        self_attn_mask: torch.Tensor | None = None,
        memory_key: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            queries: (B, Q, C) text queries (ordinary queries, then the guidance group if any).
            query_pos: (B, Q, C).
            memory: (B, S, C) flattened stride-32 map; memory_pos: (B, S, C) its encoding.
            self_attn_mask: (B, Q, Q) bool, True = may NOT attend (keeps the ordinary
                queries from seeing the guidance group), or None.
            memory_key: ``memory + memory_pos`` when the caller has it already, or None.
        Returns:
            (B, Q, C) fused queries.
        """
        x = self.self_attn(queries, attn_mask=self_attn_mask, query_pos=query_pos)
        x = self.cross_attn(
            x, memory, pos=memory_pos, query_pos=query_pos, memory_with_pos=memory_key
        )
        return self.ffn(x)
