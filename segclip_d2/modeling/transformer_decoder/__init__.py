"""Transformer decoders, built by name from ``TRANSFORMER_DECODER_REGISTRY``
(``MODEL.SEGCLIP.TRANSFORMER_DECODER_NAME``): SegCLIP's (TMP text queries, CFF, masked attention,
GTG) and Mask2Former's with learnable queries (the "no text queries" baseline)."""

from .attention_layers import MLP, CrossAttentionLayer, FFNLayer, SelfAttentionLayer
from .build import TRANSFORMER_DECODER_REGISTRY, build_transformer_decoder
from .cff import CrossModalFeatureFusion
from .class_heads import LinearClassHead, TextClassHead, build_class_head
from .masked_attention_decoder import Mask2FormerTransformerDecoder, MaskedAttentionDecoder
from .position_encoding import PositionEmbeddingSine
from .segclip_decoder import SegCLIPTransformerDecoder, gt_masks_to_attention
from .text_queries import TextQueryGenerator, check_query_slots

__all__ = [
    "MLP",
    "TRANSFORMER_DECODER_REGISTRY",
    "CrossAttentionLayer",
    "CrossModalFeatureFusion",
    "FFNLayer",
    "LinearClassHead",
    "Mask2FormerTransformerDecoder",
    "MaskedAttentionDecoder",
    "PositionEmbeddingSine",
    "SegCLIPTransformerDecoder",
    "SelfAttentionLayer",
    "TextClassHead",
    "TextQueryGenerator",
    "build_class_head",
    "build_transformer_decoder",
    "check_query_slots",
    "gt_masks_to_attention",
]
