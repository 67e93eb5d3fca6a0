"""Registry of transformer decoders (``MODEL.SEGCLIP.TRANSFORMER_DECODER_NAME``)."""

from detectron2.utils.registry import Registry

TRANSFORMER_DECODER_REGISTRY = Registry("SEGCLIP_TRANSFORMER_DECODER")
TRANSFORMER_DECODER_REGISTRY.__doc__ = """
Transformer decoders of SegCLIP. A registered class is built as
``cls(cfg, in_channels, text_dim=D, num_train_classes=K)`` (with detectron2's ``@configurable``
this calls its ``from_config``) and its ``forward(x, mask_features, text_embeddings,
guidance=None)`` returns the criterion's outputs: "pred_logits" (B, N, K+1), "pred_masks"
(B, N, H/4, W/4), "aux_outputs" and "guidance" (see ``MaskedAttentionDecoder``).
"""


def build_transformer_decoder(cfg, in_channels: int, text_dim: int, num_train_classes: int):
    """Build the decoder named by ``cfg.MODEL.SEGCLIP.TRANSFORMER_DECODER_NAME``.

    Args:
        in_channels: channels of the pixel decoder's multi-scale maps.
        text_dim: D, width of the class text embeddings.
        num_train_classes: K of the training vocabulary (the linear class head's size).
    """
    name = cfg.MODEL.SEGCLIP.TRANSFORMER_DECODER_NAME
    return TRANSFORMER_DECODER_REGISTRY.get(name)(
        cfg, in_channels, text_dim=text_dim, num_train_classes=num_train_classes
    )
