"""Mask2Former's multi-scale deformable-attention pixel decoder.

Backbone ``res3..res5`` -> 1x1 projections to ``CONVS_DIM`` -> ``ENC_LAYERS`` deformable-attention
encoder layers over the three levels together -> three refined maps (strides 32, 16, 8); an
FPN step adds the (laterally projected) ``res2`` to the upsampled stride-8 map and a 3x3 conv +
a 1x1 mask projection give the per-pixel mask features at stride 4.
"""

import functools
import logging
import math

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from torch import nn

from segclip_d2.layers import MSDeformAttn

from ..transformer_decoder.position_encoding import PositionEmbeddingSine
from .build import PIXEL_DECODER_REGISTRY

logger = logging.getLogger(__name__)


def make_norm(norm: str, channels: int) -> nn.Module | None:
    """Normalisation layer by name. "GN" is GroupNorm with ``gcd(32, channels)`` groups, so tiny
    test widths (e.g. 16 or 24 channels) work; other names go to detectron2's ``get_norm``."""
    if norm == "GN":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    return get_norm(norm, channels)


class MSDeformAttnEncoderLayer(nn.Module):
    """Deformable self-attention over all levels + FFN, each with residual and post-norm."""

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        n_levels: int = 3,
        n_heads: int = 8,
        n_points: int = 4,
        impl: str = "auto",
    ):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, impl=impl)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
        level_start_index: torch.Tensor | None,
    ) -> torch.Tensor:
        """src, pos: (B, S, C); reference_points: (B, S, L, 2); spatial_shapes: [(H_l, W_l)]."""
        value = self.self_attn.project_value(src, spatial_shapes)
        return self.attend_and_ffn(
            src, pos, reference_points, value, spatial_shapes, level_start_index
        )

    def attend_and_ffn(self, x, pos, reference_points, value, spatial_shapes, level_start_index):
        """Attention of tokens ``x`` (B, S', C) over the projected values (B, S, H, Dh), then
        residual, norm, FFN, residual, norm. Each token's result depends only on that token and
        the shared values."""
        attn = self.self_attn.attend(
            x + pos, reference_points, value, spatial_shapes, level_start_index
        )
        x = self.norm1(x + self.dropout1(attn))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(x), inplace=True)))
        return self.norm2(x + self.dropout3(ffn))


class MSDeformAttnEncoder(nn.Module):
    """Stack of deformable-attention encoder layers over ``num_levels`` flattened maps, with a
    learnable embedding per level added to the sine positional encoding."""

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        num_levels: int = 3,
        n_points: int = 4,
        impl: str = "auto",
    ):
        super().__init__()
        self.d_model = d_model
        self.num_levels = num_levels
        self.layers = nn.ModuleList(
            MSDeformAttnEncoderLayer(
                d_model, dim_feedforward, dropout, num_levels, nhead, n_points, impl
            )
            for _ in range(num_layers)
        )
        self.level_embed = nn.Parameter(torch.empty(num_levels, d_model))
        nn.init.normal_(self.level_embed)
        for p in self.parameters():
            if p.dim() > 1 and p is not self.level_embed:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()

    @staticmethod
    def reference_points(spatial_shapes: list[tuple[int, int]], device) -> torch.Tensor:
        """Pixel centres of every level, normalised to [0, 1] by the level's size.

        Args:
            spatial_shapes: [(H_l, W_l)] per level.
        Returns:
            (S, 2) reference points (x, y), S = sum_l H_l * W_l.
        """
        refs = []
        for h, w in spatial_shapes:
            ref_y, ref_x = torch.meshgrid(
                (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h,
                (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w,
                indexing="ij",
            )
            refs.append(torch.stack((ref_x.reshape(-1), ref_y.reshape(-1)), -1))  # (h*w, 2)
        return torch.cat(refs, 0)

    def forward(
        self, srcs: list[torch.Tensor], pos_embeds: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """
        Args:
            srcs: L maps (B, C, H_l, W_l), coarsest first.
            pos_embeds: L positional encodings (B, C, H_l, W_l).
        Returns:
            memory (B, S, C) with S = sum_l H_l * W_l, and the [(H_l, W_l)] of every level.
        """
        if not (len(srcs) == len(pos_embeds) == self.num_levels):
            raise ValueError(
                f"MSDeformAttnEncoder expects {self.num_levels} levels, got {len(srcs)} maps and "
                f"{len(pos_embeds)} encodings"
            )
        shapes = [(int(s.shape[2]), int(s.shape[3])) for s in srcs]
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)  # (B, S, C)
        pos_flat = torch.cat(
            [
                p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
                for lvl, p in enumerate(pos_embeds)
            ],
            1,
        )  # (B, S, C)
        b, n = src_flat.shape[:2]
        # the same point on every level; the parameters' dtype, not autocast's: bf16 positions
        # would be off by ~1/256
        ref = self.reference_points(shapes, src_flat.device).to(self.level_embed.dtype)
        reference_points = ref[None, :, None].expand(b, n, self.num_levels, 2)  # (B, S, L, 2)
        out = src_flat
        for layer in self.layers:
            # the level sizes as integers: the op takes them so, and tracing needs no tensor reads
            out = layer(out, pos_flat, reference_points, shapes, None)
        return out, shapes


def _input_projection(in_channels: int, conv_dim: int) -> nn.Module:
    """1x1 convolution + GroupNorm(32) projecting one encoder input to ``conv_dim``."""
    proj = nn.Sequential(nn.Conv2d(in_channels, conv_dim, kernel_size=1), make_norm("GN", conv_dim))
    nn.init.xavier_uniform_(proj[0].weight, gain=1)
    nn.init.constant_(proj[0].bias, 0)
    return proj


@PIXEL_DECODER_REGISTRY.register()
class MSDeformAttnPixelDecoder(nn.Module):
    """Deformable-attention encoder over the coarse levels + FPN step to stride ``common_stride``.

    ``forward(features)``:
        features: backbone outputs, e.g. {"res2": (B, C2, H/4, W/4), ..., "res5": (B, C5, H/32,
            W/32)}. Padded image positions are image content (as in Mask2Former): there is no
            padding mask.
    returns ``(mask_features (B, mask_dim, H/4, W/4), multi_scale_features)`` where
    ``multi_scale_features`` = [(B, conv_dim, H/32, W/32), (.., H/16, ..), (.., H/8, ..)].
    """

    @configurable
    def __init__(
        self,
        input_shape: dict[str, ShapeSpec],
        *,
        transformer_in_features: list[str],
        conv_dim: int,
        mask_dim: int,
        norm: str = "GN",
        transformer_dropout: float = 0.0,
        transformer_nheads: int = 8,
        transformer_dim_feedforward: int = 1024,
        transformer_enc_layers: int = 6,
        n_points: int = 4,
        common_stride: int = 4,
        msda_impl: str = "auto",
    ):
        """
        Args:
            input_shape: ShapeSpec of every backbone feature the decoder reads.
            transformer_in_features: features refined by the deformable encoder (e.g. res3..res5).
            conv_dim: channels of the decoder.
            mask_dim: channels of the mask features.
            norm: normalisation of the convolutions ("GN", "BN", "" ...).
            transformer_*: deformable encoder settings.
            n_points: sampling points per head and level.
            common_stride: stride of the mask features.
            msda_impl: MSDeformAttn implementation ("auto", "cpp", "pytorch").
        """
        super().__init__()
        shapes, enc = self._split_inputs(input_shape, transformer_in_features)
        self.in_features = [k for k, _ in shapes]  # fine -> coarse
        self.transformer_in_features = [k for k, _ in enc]  # coarse -> fine (strides 32, 16, 8)
        self.transformer_strides = [v.stride for _, v in enc]
        self.num_levels = len(enc)
        self.common_stride = common_stride
        self.conv_dim = conv_dim
        self.mask_dim = mask_dim
        self.input_proj = nn.ModuleList(
            _input_projection(spec.channels, conv_dim) for _, spec in enc
        )
        self.transformer = MSDeformAttnEncoder(
            d_model=conv_dim,
            nhead=transformer_nheads,
            num_layers=transformer_enc_layers,
            dim_feedforward=transformer_dim_feedforward,
            dropout=transformer_dropout,
            num_levels=self.num_levels,
            n_points=n_points,
            impl=msda_impl,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)
        self._build_fpn(shapes, conv_dim, norm)
        # 1x1, as Mask2Former: a 3x3 conv at stride 4 costs as much as the rest of the FPN step.
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=1)
        weight_init.c2_xavier_fill(self.mask_features)

    @staticmethod
    def _split_inputs(input_shape, transformer_in_features):
        """All inputs sorted fine -> coarse, and the encoder's inputs sorted coarse -> fine."""
        missing = [f for f in transformer_in_features if f not in input_shape]
        if missing:
            raise ValueError(
                f"MSDeformAttnPixelDecoder: features {missing} are not among the decoder's "
                f"inputs {sorted(input_shape)}"
            )
        shapes = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        enc = sorted(
            ((k, v) for k, v in shapes if k in transformer_in_features),
            key=lambda kv: -kv[1].stride,
        )
        return shapes, enc

    def _build_fpn(self, shapes, conv_dim: int, norm: str) -> None:
        """Lateral and output convolutions of the FPN step over the finer features (stride below
        the finest encoder level, at least ``common_stride``), processed coarse -> fine."""
        min_enc_stride = min(self.transformer_strides)
        stride = self.common_stride
        fpn = [(k, v) for k, v in reversed(shapes) if stride <= v.stride < min_enc_stride]
        expected = int(math.log2(min_enc_stride) - math.log2(stride))
        if len(fpn) != expected:
            raise ValueError(
                f"MSDeformAttnPixelDecoder: need one input per stride between common_stride "
                f"{stride} and {min_enc_stride}, got {[k for k, _ in fpn]}"
            )
        self.fpn_features = [k for k, _ in fpn]
        use_bias = norm == ""
        self.lateral_convs = nn.ModuleList()
        self.output_convs = nn.ModuleList()
        for _, spec in fpn:
            lateral = Conv2d(
                spec.channels,
                conv_dim,
                kernel_size=1,
                bias=use_bias,
                norm=make_norm(norm, conv_dim),
            )
            output = Conv2d(
                conv_dim,
                conv_dim,
                kernel_size=3,
                padding=1,
                bias=use_bias,
                norm=make_norm(norm, conv_dim),
                # in place: neither GroupNorm's nor the convolution's backward reads its output,
                # and at stride 4 a new (B, C, H/4, W/4) tensor costs a pass over fresh memory
                activation=functools.partial(F.relu, inplace=True),
            )
            weight_init.c2_xavier_fill(lateral)
            weight_init.c2_xavier_fill(output)
            self.lateral_convs.append(lateral)
            self.output_convs.append(output)

    @classmethod
    def from_config(cls, cfg, input_shape: dict[str, ShapeSpec]):
        pd = cfg.MODEL.SEGCLIP.PIXEL_DECODER
        missing = [f for f in pd.IN_FEATURES if f not in input_shape]
        if missing:
            raise ValueError(
                f"MODEL.SEGCLIP.PIXEL_DECODER.IN_FEATURES {list(pd.IN_FEATURES)}: the backbone "
                f"has no {missing} (it outputs {sorted(input_shape)})"
            )
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in pd.IN_FEATURES},
            "transformer_in_features": list(pd.DEFORM_ATTN_IN_FEATURES),
            "conv_dim": pd.CONVS_DIM,
            "mask_dim": cfg.MODEL.SEGCLIP.MASK_DIM,
            "norm": pd.NORM,
            "transformer_dropout": cfg.MODEL.SEGCLIP.DROPOUT,
            "transformer_nheads": cfg.MODEL.SEGCLIP.NHEADS,
            "transformer_dim_feedforward": pd.DIM_FEEDFORWARD,
            "transformer_enc_layers": pd.ENC_LAYERS,
            "n_points": pd.N_POINTS,
            "common_stride": pd.COMMON_STRIDE,
            "msda_impl": cfg.MODEL.SEGCLIP.MSDA_IMPL,
        }

    def forward(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        missing = [f for f in self.in_features if f not in features]
        if missing:
            raise ValueError(f"MSDeformAttnPixelDecoder: backbone features {missing} missing")
        srcs = [
            proj(features[name])
            for proj, name in zip(self.input_proj, self.transformer_in_features)
        ]
        pos = [self.pe_layer(x) for x in srcs]  # (B, C, h, w) each
        memory, shapes = self.transformer(srcs, pos)  # (B, S, C)
        b = memory.shape[0]
        outs = [
            y.transpose(1, 2).reshape(b, self.conv_dim, h, w)
            for y, (h, w) in zip(memory.split([h * w for h, w in shapes], dim=1), shapes)
        ]  # coarse -> fine

        y = outs[-1]
        for name, lateral_conv, output_conv in zip(
            self.fpn_features, self.lateral_convs, self.output_convs
        ):
            lat = lateral_conv(features[name])
            # y is a (B, C, h, w) view of token-major memory (channels-last strides), which
            # bilinear upsampling on CPU handles ~8x slower than a contiguous map.
            up = F.interpolate(
                y.contiguous(), size=lat.shape[-2:], mode="bilinear", align_corners=False
            )
            # in place: the lateral conv's norm (or the conv itself) does not read its output in
            # backward
            y = lat.add_(up)
            y = output_conv(y)
        mask_features = self.mask_features(y)  # (B, mask_dim, H/4, W/4)
        return mask_features, outs
