"""MSDeformAttnPixelDecoder: shapes, tiny GroupNorm widths, reference points, registry, grads."""

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec

from segclip_d2.config import add_segclip_config
from segclip_d2.modeling.pixel_decoder import (
    PIXEL_DECODER_REGISTRY,
    MSDeformAttnEncoder,
    MSDeformAttnPixelDecoder,
    build_pixel_decoder,
)

SHAPES = {
    "res2": ShapeSpec(channels=8, stride=4),
    "res3": ShapeSpec(channels=16, stride=8),
    "res4": ShapeSpec(channels=24, stride=16),
    "res5": ShapeSpec(channels=32, stride=32),
}


def _decoder(conv_dim=32, mask_dim=16, msda_impl="pytorch", **kw):
    torch.manual_seed(0)
    return MSDeformAttnPixelDecoder(
        SHAPES,
        transformer_in_features=["res3", "res4", "res5"],
        conv_dim=conv_dim,
        mask_dim=mask_dim,
        transformer_nheads=4,
        transformer_enc_layers=2,
        transformer_dim_feedforward=64,
        msda_impl=msda_impl,
        **kw,
    ).eval()


def _features(b, h, w, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(b, s.channels, h // s.stride, w // s.stride, generator=g)
        for k, s in SHAPES.items()
    }


@pytest.mark.parametrize("conv_dim", [32, 24])
def test_output_shapes_and_order(conv_dim):
    dec = _decoder(conv_dim=conv_dim)  # 24 channels: GroupNorm must not need 32 groups
    mask_features, ms = dec(_features(2, 64, 96))
    assert mask_features.shape == (2, 16, 16, 24)
    # coarsest first: strides 32, 16, 8
    assert [tuple(x.shape) for x in ms] == [
        (2, conv_dim, 2, 3),
        (2, conv_dim, 4, 6),
        (2, conv_dim, 8, 12),
    ]
    assert dec.transformer_in_features == ["res5", "res4", "res3"]
    assert dec.fpn_features == ["res2"]
    assert torch.isfinite(mask_features).all()


def test_reference_points_are_normalised_pixel_centres():
    ref = MSDeformAttnEncoder.reference_points([(2, 2), (1, 2)], "cpu")
    assert ref.shape == (6, 2) and ref.dtype == torch.float32
    # pixel centres normalised to [0, 1] as (x, y), level after level
    torch.testing.assert_close(
        ref[:4], torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])
    )
    torch.testing.assert_close(ref[4:], torch.tensor([[0.25, 0.5], [0.75, 0.5]]))


def test_the_decoder_takes_no_padding_mask():
    """Padded image positions are image content (as in Mask2Former); nothing else is accepted."""
    dec = _decoder()
    with pytest.raises(TypeError):
        dec(_features(1, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))


def test_gradients_reach_every_input_level():
    dec = _decoder().train()
    f = {k: v.requires_grad_() for k, v in _features(1, 64, 64).items()}
    mf, ms = dec(f)
    (mf.sum() + sum(x.sum() for x in ms)).backward()
    for k, v in f.items():
        assert v.grad is not None and torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0, k
    for name, p in dec.named_parameters():
        assert p.grad is not None, name


def test_built_from_config_registry():
    cfg = get_cfg()
    add_segclip_config(cfg)
    pd = cfg.MODEL.SEGCLIP.PIXEL_DECODER
    pd.CONVS_DIM, pd.ENC_LAYERS, pd.DIM_FEEDFORWARD = 32, 1, 64
    cfg.MODEL.SEGCLIP.MASK_DIM, cfg.MODEL.SEGCLIP.NHEADS = 16, 4
    cfg.MODEL.SEGCLIP.MSDA_IMPL = "pytorch"
    assert "MSDeformAttnPixelDecoder" in PIXEL_DECODER_REGISTRY
    dec = build_pixel_decoder(cfg, SHAPES)
    assert isinstance(dec, MSDeformAttnPixelDecoder)
    assert len(dec.transformer.layers) == 1
    assert dec.transformer.layers[0].self_attn.impl == "pytorch"
    mf, _ = dec(_features(1, 64, 64))
    assert mf.shape == (1, 16, 16, 16)

    pd.IN_FEATURES = ["res2", "res3", "res4", "res6"]
    with pytest.raises(ValueError, match="res6"):
        build_pixel_decoder(cfg, SHAPES)


@pytest.mark.parametrize("impl", ["pytorch", "auto"])
@pytest.mark.parametrize("bf16", [False, True])
def test_chunked_encoder_and_cpu_kernels_equal_plain_decoder(impl, bf16):
    """optimize_for_inference's pixel-decoder transforms (encoder layers in token chunks with the
    values projected once, oneDNN linear and short-row softmax) give the plain decoder's outputs
    (chunks of 7 tokens: uneven, smaller than every level), fp32 and bf16."""
    import copy

    from segclip_d2.predict.optimize import (
        ChunkedEncoderLayer,
        chunk_encoder_layers,
        install_cpu_kernels,
    )

    dec = _decoder(msda_impl=impl)
    with torch.no_grad():
        for p in dec.parameters():  # move the deformable attention away from its init
            p.add_(0.05 * torch.randn_like(p))
    feats = _features(2, 64, 96)
    fast = copy.deepcopy(dec)
    assert chunk_encoder_layers(fast, chunk_tokens=7) == len(dec.transformer.layers)
    install_cpu_kernels(fast)
    assert all(isinstance(layer, ChunkedEncoderLayer) for layer in fast.transformer.layers)
    assert fast.state_dict().keys() == dec.state_dict().keys()
    tol = dict(rtol=2e-2, atol=2e-2) if bf16 else dict(rtol=1e-5, atol=1e-5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        mf_ref, outs_ref = dec(feats)
        mf, outs = fast(feats)
    torch.testing.assert_close(mf.float(), mf_ref.float(), **tol)
    for o, r in zip(outs, outs_ref):
        torch.testing.assert_close(o.float(), r.float(), **tol)
