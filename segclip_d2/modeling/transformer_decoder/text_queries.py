"""TMP (Text Mapping Prompt): the decoder's N text queries from the K class text embeddings."""

import torch
import torch.nn.functional as F
from torch import nn


def check_query_slots(num_classes: int, num_queries: int) -> None:
    """TMP puts every class in its own query slot: raise ValueError unless K <= N."""
    if num_classes > num_queries:
        raise ValueError(
            f"{num_classes} classes but only MODEL.SEGCLIP.NUM_QUERIES={num_queries} query "
            "slots: TMP puts every class in its own slot (raise NUM_QUERIES)"
        )


class TextQueryGenerator(nn.Module):
    """Builds ``Q_text`` = class slots + learnable context, and the queries' positional embeddings.

    The K frozen class text embeddings ``(K, D)`` are L2-normalised (CLIP's embedding space is a
    cosine space) and mapped to the decoder width by a learnable linear projection ``D -> C``
    (``N_text``, (K, C)). They fill slots ``0..K-1`` of the N query slots; slots ``K..N-1`` are
    blank (zeros). A learnable context embedding ``Q_ctx`` (N, C) is added to every slot.

    The projection's weights start with unit variance so a projected unit-norm text embedding
    has the same per-channel scale as the context embeddings (``nn.Embedding``: N(0, 1)); with a
    default-initialised linear map the text would start ~25x smaller than the context.

    Guidance queries (GTG) reuse the same projection (no context added) and, as positional
    embedding, the positional embedding of their class's slot -- so GTG creates no parameters of
    its own.

    Args:
        text_dim: D, width of the text encoder's embeddings.
        hidden_dim: C, decoder width.
        num_queries: N (must be >= the number of classes K).
    """

    def __init__(self, text_dim: int, hidden_dim: int, num_queries: int):
        super().__init__()
        self.num_queries = num_queries
        self.hidden_dim = hidden_dim
        self.text_dim = text_dim
        self.text_proj = nn.Linear(text_dim, hidden_dim)
        self.query_ctx = nn.Embedding(num_queries, hidden_dim)  # Q_ctx (N, C)
        self.query_pos = nn.Embedding(num_queries, hidden_dim)  # (N, C)
        nn.init.normal_(self.text_proj.weight, std=1.0)
        nn.init.zeros_(self.text_proj.bias)

    def project(self, text_embeddings: torch.Tensor) -> torch.Tensor:
        """(K, D) frozen text embeddings -> (K, C) projected class embeddings ``N_text``."""
        if text_embeddings.dim() != 2 or text_embeddings.shape[1] != self.text_dim:
            raise ValueError(
                f"TextQueryGenerator: text embeddings must be (K, {self.text_dim}), got "
                f"{tuple(text_embeddings.shape)}"
            )
        t = F.normalize(text_embeddings.to(self.text_proj.weight.dtype), dim=-1)
        return self.text_proj(t)

    def forward(
        self, text_embeddings: torch.Tensor, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            text_embeddings: (K, D) class text embeddings, K <= N.
            batch_size: B.
        Returns:
            Q_text (B, N, C) and the query positional embeddings (B, N, C).
        """
        k = text_embeddings.shape[0]
        check_query_slots(k, self.num_queries)
        n_text = self.project(text_embeddings)  # (K, C)
        blank = n_text.new_zeros(self.num_queries - k, self.hidden_dim)  # (N-K, C)
        q = torch.cat([n_text, blank], 0) + self.query_ctx.weight  # (N, C)
        pos = self.query_pos.weight
        return q[None].expand(batch_size, -1, -1), pos[None].expand(batch_size, -1, -1)

    def guidance(
        self, text_embeddings: torch.Tensor, classes: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Guidance queries ``Q_gt`` of the classes present in each image.

        Args:
            text_embeddings: (K, D) class text embeddings (the cached vocabulary: the present
                classes are just indexed, the text encoder is not run again).
            classes: per image, (T_i,) int64 class ids (sorted, unique).
        Returns:
            Q_gt (B, T, C), positional embeddings (B, T, C) and ``valid`` (B, T) bool,
            T = max_i T_i; padded slots are zeros and ``valid`` False.
        """
        k = text_embeddings.shape[0]
        b = len(classes)
        t = max((int(c.numel()) for c in classes), default=0)
        n_text = self.project(text_embeddings)  # (K, C)
        dev = n_text.device
        q = n_text.new_zeros(b, t, self.hidden_dim)
        pos = n_text.new_zeros(b, t, self.hidden_dim)
        valid = torch.zeros(b, t, dtype=torch.bool, device=dev)
        for i, c in enumerate(classes):
            c = c.to(device=dev, dtype=torch.long)
            if c.numel() == 0:
                continue
            if int(c.min()) < 0 or int(c.max()) >= k:
                raise ValueError(
                    f"GTG: image {i} has class ids {c.tolist()} outside the vocabulary 0..{k - 1}"
                )
            q[i, : c.numel()] = n_text[c]
            pos[i, : c.numel()] = self.query_pos.weight[c]
            valid[i, : c.numel()] = True
        return q, pos, valid
