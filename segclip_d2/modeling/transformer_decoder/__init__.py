"""SegCLIP's transformer decoder: TMP text queries, CFF, masked-attention layers, GTG."""

from .attention_layers import MLP, CrossAttentionLayer, FFNLayer, SelfAttentionLayer
from .cff import CrossModalFeatureFusion
from .class_heads import LinearClassHead, TextClassHead, build_class_head
from .position_encoding import PositionEmbeddingSine
from .segclip_decoder import SegCLIPTransformerDecoder, gt_masks_to_attention
from .text_queries import TextQueryGenerator

__all__ = [
    "MLP",
    "CrossAttentionLayer",
    "CrossModalFeatureFusion",
    "FFNLayer",
    "LinearClassHead",
    "PositionEmbeddingSine",
    "SegCLIPTransformerDecoder",
    "SelfAttentionLayer",
    "TextClassHead",
    "TextQueryGenerator",
    "build_class_head",
    "gt_masks_to_attention",
]
