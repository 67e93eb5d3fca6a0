"""Class heads: (B, Q, C) query features -> (B, Q, K+1) logits (last = "no object")."""

import math

import torch
import torch.nn.functional as F
from torch import nn


class LinearClassHead(nn.Module):
    """``nn.Linear(C, K+1)``; K is fixed when the model is built (the training vocabulary)."""

    def __init__(self, hidden_dim: int, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.linear = nn.Linear(hidden_dim, num_classes + 1)

    def forward(self, x: torch.Tensor, text_embeddings: torch.Tensor | None) -> torch.Tensor:
        """x: (B, Q, C); text_embeddings: (K, D) (only K is checked) or None -> (B, Q, K+1)."""
        if text_embeddings is not None and text_embeddings.shape[0] != self.num_classes:
            raise ValueError(
                f"The linear class head was built for {self.num_classes} classes but the "
                f"vocabulary has {text_embeddings.shape[0]}; use MODEL.SEGCLIP.CLASS_HEAD 'text' "
                "to change the vocabulary"
            )
        return self.linear(x)


class TextClassHead(nn.Module):
    """Cosine similarity between projected query features and the projected class text
    embeddings, times a learnable logit scale (CLIP-style, initialised to 1/0.07, clamped at
    100). The "no object" logit is the scaled cosine with a learnable void embedding, so each
    query can decide "no object" on its own. Works with any vocabulary size K.
    """

    def __init__(self, hidden_dim: int, text_dim: int):
        super().__init__()
        self.text_dim = text_dim
        self.query_proj = nn.Linear(hidden_dim, hidden_dim)
        # maps class text embeddings into the query space (TMP's TextQueryGenerator.text_proj
        # maps them to the query slots: another projection)
        self.class_embed_proj = nn.Linear(text_dim, hidden_dim)
        self.void_embed = nn.Parameter(torch.empty(hidden_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        nn.init.normal_(self.void_embed, std=0.02)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the rename call the projection "text_proj"
        for name in ("weight", "bias"):
            old = f"{prefix}text_proj.{name}"
            if old in state_dict:
                state_dict[f"{prefix}class_embed_proj.{name}"] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """x: (B, Q, C); text_embeddings: (K, D) -> (B, Q, K+1)."""
        if text_embeddings.dim() != 2 or text_embeddings.shape[1] != self.text_dim:
            raise ValueError(
                f"TextClassHead: text embeddings must be (K, {self.text_dim}), got "
                f"{tuple(text_embeddings.shape)}"
            )
        q = F.normalize(self.query_proj(x), dim=-1)  # (B, Q, C)
        t = self.class_embed_proj(F.normalize(text_embeddings.to(q.dtype), dim=-1))  # (K, C)
        classes = F.normalize(torch.cat([t, self.void_embed[None]], 0), dim=-1)  # (K+1, C)
        scale = self.logit_scale.exp().clamp(max=100.0)
        return scale * torch.einsum("bqc,kc->bqk", q, classes)


def build_class_head(name: str, hidden_dim: int, num_classes: int, text_dim: int) -> nn.Module:
    """``name``: "linear" or "text" (MODEL.SEGCLIP.CLASS_HEAD)."""
    if name == "linear":
        return LinearClassHead(hidden_dim, num_classes)
    if name == "text":
        return TextClassHead(hidden_dim, text_dim)
    raise ValueError(f"MODEL.SEGCLIP.CLASS_HEAD must be 'linear' or 'text', got {name!r}")
