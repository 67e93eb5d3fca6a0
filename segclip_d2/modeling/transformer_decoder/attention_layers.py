"""Building blocks shared by the CFF module and the masked-attention decoder.

All tensors are batch-first: queries ``(B, Q, C)``, memory ``(B, S, C)``. Each block is
"sub-layer + residual + LayerNorm", post-norm by default (``normalize_before=True`` gives the
pre-norm variant), as in Mask2Former.
"""

import torch
import torch.nn.functional as F
from torch import nn


def _with_pos(x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    return x if pos is None else x + pos


def xavier_init_matrices(module: nn.Module) -> None:
    """Xavier-uniform initialisation of every weight matrix of ``module`` (biases, norms kept)."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


def multi_head_attention(
    attn: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    blocked: torch.Tensor | None = None,
) -> torch.Tensor:
    """``attn``'s attention computed with ``F.scaled_dot_product_attention``.

    Same parameters and result as ``attn(query, key, value, attn_mask=...)`` (batch-first, no
    bias_k / zero attention), but the mask is one per image, broadcast over the heads, instead of
    ``nn.MultiheadAttention``'s (B * nhead, Q, S) copy turned into an additive float mask: at the
    stride-8 level that copy alone is tens of megabytes per decoder layer.

    Args:
        query: (B, Q, C); key, value: (B, S, C).
        blocked: (B, Q, S) bool, True = may NOT attend; or None.
    Returns:
        (B, Q, C)
    """
    b, q_len, c = query.shape
    s_len = key.shape[1]
    h = attn.num_heads
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3) if attn.in_proj_bias is not None else (None,) * 3
    q = F.linear(query, w_q, b_q).view(b, q_len, h, c // h).transpose(1, 2)  # (B, h, Q, d)
    k = F.linear(key, w_k, b_k).view(b, s_len, h, c // h).transpose(1, 2)  # (B, h, S, d)
    v = F.linear(value, w_v, b_v).view(b, s_len, h, c // h).transpose(1, 2)
    allowed = None if blocked is None else ~blocked[:, None]  # (B, 1, Q, S)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed, dropout_p=attn.dropout if attn.training else 0.0
    )  # (B, h, Q, d)
    return F.linear(
        out.transpose(1, 2).reshape(b, q_len, c), attn.out_proj.weight, attn.out_proj.bias
    )


class _ResidualNorm(nn.Module):
    """The part the attention layers share: dropout, residual and LayerNorm, before the layer
    (``normalize_before``, pre-norm) or after it (post-norm)."""

    def __init__(self, d_model: int, dropout: float, normalize_before: bool):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def _input(self, tgt: torch.Tensor) -> torch.Tensor:
        return self.norm(tgt) if self.normalize_before else tgt

    def _residual(self, tgt: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        tgt = tgt + self.dropout(out)
        return tgt if self.normalize_before else self.norm(tgt)


class SelfAttentionLayer(_ResidualNorm):
    """Multi-head self-attention over the queries + residual + LayerNorm."""

    def __init__(
        self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False
    ):
        super().__init__(d_model, dropout, normalize_before)
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        xavier_init_matrices(self)

    def forward(
        self,
        tgt: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        query_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            tgt: (B, Q, C) queries.
            attn_mask: (B, Q, Q) bool, True = may NOT attend; or None.
            query_pos: (B, Q, C) positional embedding added to queries and keys.
        Returns:
            (B, Q, C)
        """
        x = self._input(tgt)
        q = k = _with_pos(x, query_pos)
        return self._residual(tgt, multi_head_attention(self.self_attn, q, k, x, attn_mask))


class CrossAttentionLayer(_ResidualNorm):
    """Multi-head cross-attention from the queries to a memory + residual + LayerNorm."""

    def __init__(
        self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False
    ):
        super().__init__(d_model, dropout, normalize_before)
        self.multihead_attn = nn.MultiheadAttention(
            d_model, nhead, dropout=dropout, batch_first=True
        )
        xavier_init_matrices(self)

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None = None,
        pos: torch.Tensor | None = None,
        query_pos: torch.Tensor | None = None,
        memory_with_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            tgt: (B, Q, C) queries.
            memory: (B, S, C) flattened image features.
            memory_mask: (B, Q, S) bool, True = may NOT attend; or None.
            pos: (B, S, C) positional encoding of the memory (added to the keys).
            query_pos: (B, Q, C) positional embedding of the queries.
            memory_with_pos: ``memory + pos`` computed by the caller (layers that attend to
                the same memory can share it), or None to add them here.
        Returns:
            (B, Q, C)
        """
        x = self._input(tgt)
        out = multi_head_attention(
            self.multihead_attn,
            _with_pos(x, query_pos),
            _with_pos(memory, pos) if memory_with_pos is None else memory_with_pos,
            memory,
            memory_mask,
        )
        return self._residual(tgt, out)


class FFNLayer(nn.Module):
    """Two-layer feed-forward network + residual + LayerNorm."""

    def __init__(
        self,
        d_model: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        normalize_before: bool = False,
    ):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        xavier_init_matrices(self)

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:
        """(B, Q, C) -> (B, Q, C)"""
        x = self.norm(tgt) if self.normalize_before else tgt
        out = self.linear2(self.dropout(F.relu(self.linear1(x), inplace=True)))
        tgt = tgt + self.dropout(out)
        return tgt if self.normalize_before else self.norm(tgt)


class MLP(nn.Module):
    """Plain multi-layer perceptron (ReLU between layers, none after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x
