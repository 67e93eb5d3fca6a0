"""SegCLIP transformer decoder: TMP queries, CFF, masked attention, GTG isolation, class heads."""

import pytest
import torch

from segclip_d2.modeling.transformer_decoder import (
    MLP,
    CrossAttentionLayer,
    CrossModalFeatureFusion,
    FFNLayer,
    PositionEmbeddingSine,
    SegCLIPTransformerDecoder,
    SelfAttentionLayer,
    TextClassHead,
    TextQueryGenerator,
    gt_masks_to_attention,
)

B, C, D, K, N, M = 2, 32, 24, 4, 6, 16


def _decoder(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(
        text_dim=D,
        num_train_classes=K,
        hidden_dim=C,
        num_queries=N,
        nheads=4,
        dim_feedforward=64,
        dec_layers=3,
        pre_norm=False,
        mask_dim=M,
    )
    args.update(kw)
    return SegCLIPTransformerDecoder(C, **args).eval()


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(B, C, s, s, generator=g) for s in (2, 4, 8)]  # strides 32, 16, 8 of 64x64
    mask_features = torch.randn(B, M, 16, 16, generator=g)
    text = torch.randn(K, D, generator=g)
    return x, mask_features, text


def _guidance(seed=2, classes=((0, 2), (1,))):
    g = torch.Generator().manual_seed(seed)
    cls = [torch.tensor(c, dtype=torch.long) for c in classes]
    masks = [torch.rand(len(c), 64, 64, generator=g) > 0.5 for c in classes]
    return {"classes": cls, "masks": masks}


def test_output_structure_and_shapes():
    dec = _decoder().train()  # deep-supervision outputs exist in training
    x, mf, text = _inputs()
    out = dec(x, mf, text)
    assert out["pred_logits"].shape == (B, N, K + 1)
    assert out["pred_masks"].shape == (B, N, 16, 16)
    # CFF prediction + every layer but the last
    assert len(out["aux_outputs"]) == 3
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (B, N, K + 1)
        assert aux["pred_masks"].shape == (B, N, 16, 16)
    assert out["guidance"] is None

    out = dec(x, mf, text, _guidance())
    g = out["guidance"]
    assert g["pred_logits"].shape == (B, 2, K + 1)
    assert g["pred_masks"].shape == (B, 2, 16, 16)
    assert len(g["aux_outputs"]) == 3
    assert g["valid"].tolist() == [[True, True], [True, False]]


def test_guidance_group_does_not_leak_into_ordinary_queries():
    dec = _decoder().train()  # dropout is 0: training mode is deterministic here
    x, mf, text = _inputs()
    plain = dec(x, mf, text)
    a = dec(x, mf, text, _guidance(seed=2, classes=((0, 2), (1,))))
    b = dec(x, mf, text, _guidance(seed=3, classes=((1, 3), (2,))))  # other queries and masks
    c = dec(x, mf, text, _guidance(seed=4, classes=((0, 2), (1,))))  # same queries, other masks
    for out in (a, b, c):
        for key in ("pred_logits", "pred_masks"):
            torch.testing.assert_close(out[key], plain[key], rtol=1e-5, atol=1e-5)
            for aux_o, aux_p in zip(out["aux_outputs"], plain["aux_outputs"]):
                torch.testing.assert_close(aux_o[key], aux_p[key], rtol=1e-5, atol=1e-5)
    # ... while the guidance outputs do depend on their queries and on their masks
    assert (a["guidance"]["pred_logits"] - b["guidance"]["pred_logits"]).abs().max() > 1e-3
    assert (a["guidance"]["pred_masks"] - c["guidance"]["pred_masks"]).abs().max() > 1e-3


def test_gtg_creates_no_parameters_and_cff_off_builds_no_cff():
    on = _decoder(cff_enabled=True)
    off = _decoder(cff_enabled=False)
    cff_keys = {k for k in on.state_dict() if k.startswith("cff.")}
    assert cff_keys and set(on.state_dict()) - set(off.state_dict()) == cff_keys
    assert set(off.state_dict()) < set(on.state_dict())
    off.load_state_dict({k: v for k, v in on.state_dict().items() if k not in cff_keys})
    x, mf, text = _inputs()
    # CFF off: no CFF module, and every parameter gets a gradient (DDP sees no unused ones)
    off.train()
    out = off(x, mf, text, _guidance())
    loss = out["pred_masks"].sum() + out["guidance"]["pred_logits"].sum()
    loss = loss + sum(a["pred_logits"].sum() for a in out["aux_outputs"])
    loss.backward()
    assert off.cff is None
    assert [n for n, p in off.named_parameters() if p.grad is None] == []
    assert (
        on.eval()(x, mf, text)["pred_logits"].shape == off.eval()(x, mf, text)["pred_logits"].shape
    )
    assert not torch.allclose(on(x, mf, text)["pred_logits"], off(x, mf, text)["pred_logits"])


def test_text_queries_fill_class_slots_and_blank_slots():
    tmp = TextQueryGenerator(D, C, N)
    text = torch.randn(K, D)
    q, pos = tmp(text, B)
    assert q.shape == pos.shape == (B, N, C)
    ctx = tmp.query_ctx.weight
    torch.testing.assert_close(q[0, K:], ctx[K:])  # blank slots carry only context
    torch.testing.assert_close(q[1, :K], tmp.project(text) + ctx[:K])
    # guidance: the class's projected embedding and its slot's positional embedding
    qg, pg, valid = tmp.guidance(text, [torch.tensor([1, 3]), torch.tensor([], dtype=torch.long)])
    assert qg.shape == (2, 2, C) and valid.tolist() == [[True, True], [False, False]]
    torch.testing.assert_close(qg[0], tmp.project(text)[[1, 3]])
    torch.testing.assert_close(pg[0], tmp.query_pos.weight[[1, 3]])
    assert qg[1].abs().sum() == 0
    with pytest.raises(ValueError, match="NUM_QUERIES"):
        tmp(torch.randn(N + 1, D), 1)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tmp.guidance(text, [torch.tensor([K])])


def test_more_classes_than_queries_is_rejected():
    with pytest.raises(ValueError, match="NUM_QUERIES"):
        _decoder(num_train_classes=N + 1)


def test_gt_masks_to_attention():
    m = torch.zeros(3, 8, 8, dtype=torch.bool)
    m[0, :4, :4] = True  # exactly the top-left cell of a 2x2 map
    m[1, 0, 7] = True  # one pixel: less than half of any cell -> kept where it touches
    m[2, :, :3] = True  # 3/4 of the left cells' area
    blocked = gt_masks_to_attention([m, m[:1]], 3, (2, 2))
    assert blocked.shape == (2, 3, 2, 2)
    assert blocked[0, 0].tolist() == [[False, True], [True, True]]
    assert blocked[0, 1].tolist() == [[True, False], [True, True]]
    assert blocked[0, 2].tolist() == [[False, True], [False, True]]
    assert not blocked[1, 1:].any()  # padded slots are unblocked


def test_masked_attention_mask_unblocks_fully_masked_rows():
    dec = _decoder()
    pred = torch.full((1, N, 16, 16), -5.0)  # every predicted mask empty
    pred[0, 0, :8] = 5.0  # query 0 covers the top half
    mask = dec.cross_attn_mask(pred, (4, 4), None)
    assert mask.shape == (1, N, 16)  # one mask per image, broadcast over the heads
    assert mask[0, 0].view(4, 4)[:2].logical_not().all() and mask[0, 0].view(4, 4)[2:].all()
    assert not mask[:, 1:].any()  # fully blocked rows become fully open
    sm = dec._self_attn_mask(torch.tensor([[True, False]]))
    assert sm.shape == (1, N + 2, N + 2)
    assert sm[0, :N, N:].all() and not sm[0, :N, :N].any()
    assert not sm[0, N:, : N + 1].any() and sm[0, :, N + 1].all()


def test_text_class_head_handles_any_vocabulary_and_linear_head_checks_k():
    dec = _decoder(class_head="text")
    assert isinstance(dec.class_head, TextClassHead)
    x, mf, _ = _inputs()
    for k in (2, 5):
        out = dec(x, mf, torch.randn(k, D))
        assert out["pred_logits"].shape == (B, N, k + 1)
    with pytest.raises(ValueError, match="linear class head"):
        _decoder()(x, mf, torch.randn(K + 1, D))
    with pytest.raises(ValueError, match="CLASS_HEAD"):
        _decoder(class_head="cosine")


def test_position_embedding_sine():
    pe = PositionEmbeddingSine(8, normalize=True)
    x = torch.zeros(2, 3, 4, 5)
    pos = pe(x)
    assert pos.shape == (2, 16, 4, 5)
    assert not torch.allclose(pos[:, :, 0], pos[:, :, 1])  # varies along y
    torch.testing.assert_close(pe(x, torch.zeros(2, 4, 5, dtype=torch.bool)), pos)
    pad = torch.zeros(2, 4, 5, dtype=torch.bool)
    pad[:, 2:] = True  # the valid rows are normalised over the valid extent only
    assert not torch.allclose(pe(x, pad)[:, :, :2], pos[:, :, :2])


@pytest.mark.parametrize("pre_norm", [False, True])
def test_cff_and_attention_layer_shapes(pre_norm):
    torch.manual_seed(0)
    cff = CrossModalFeatureFusion(C, 4, 64, 0.0, pre_norm)
    q, qpos = torch.randn(B, N, C), torch.randn(B, N, C)
    mem, mpos = torch.randn(B, 12, C), torch.randn(B, 12, C)
    out = cff(q, qpos, mem, mpos)
    assert out.shape == (B, N, C) and torch.isfinite(out).all()
    # the fused queries depend on the image memory (cross-attention) ...
    assert not torch.allclose(cff(q, qpos, mem + torch.randn(C), mpos), out)
    # ... and every slot on the others (self-attention): change slot 0, slot 1 moves too
    q2 = q.clone()
    q2[:, 0] += torch.randn(C)  # (not a constant shift: LayerNorm would remove it)
    assert not torch.allclose(cff(q2, qpos, mem, mpos)[:, 1], out[:, 1])
    assert SelfAttentionLayer(C, 4, normalize_before=pre_norm)(q, query_pos=qpos).shape == q.shape
    cross = CrossAttentionLayer(C, 4, normalize_before=pre_norm)
    assert cross(q, mem, pos=mpos, query_pos=qpos).shape == q.shape
    assert FFNLayer(C, 64, normalize_before=pre_norm)(q).shape == q.shape
    assert MLP(C, C, M, 3)(q).shape == (B, N, M)
    dec = _decoder(pre_norm=pre_norm)
    x, mf, text = _inputs()
    assert dec(x, mf, text, _guidance())["guidance"]["pred_masks"].shape == (B, 2, 16, 16)


def test_eval_forward_is_the_training_forward_without_deep_supervision():
    """One computation in both modes (dropout is 0): eval returns the last prediction only."""
    dec = _decoder()
    x, mf, text = _inputs()
    ev = dec.eval()(x, mf, text)
    tr = dec.train()(x, mf, text)
    assert ev["aux_outputs"] == [] and len(tr["aux_outputs"]) == 3
    torch.testing.assert_close(ev["pred_logits"], tr["pred_logits"], rtol=0, atol=0)
    torch.testing.assert_close(ev["pred_masks"], tr["pred_masks"], rtol=0, atol=0)


def test_attention_with_per_image_mask_equals_multihead_attention():
    """The decoder's attention (one mask per image, broadcast over heads) computes exactly what
    nn.MultiheadAttention computes with its per-head (B * nhead, Q, S) mask."""
    from segclip_d2.modeling.transformer_decoder.attention_layers import multi_head_attention

    torch.manual_seed(0)
    attn = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    q, kv = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    blocked = torch.rand(2, 5, 7) > 0.6
    blocked[:, :, 0] = False  # no fully blocked row
    ours = multi_head_attention(attn, q, kv, kv, blocked)
    ref = attn(q, kv, kv, attn_mask=blocked.repeat_interleave(4, 0), need_weights=False)[0]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        multi_head_attention(attn, q, kv, kv), attn(q, kv, kv, need_weights=False)[0]
    )


def test_text_class_head_loads_checkpoints_with_the_old_projection_name():
    torch.manual_seed(0)
    head = TextClassHead(C, D)
    old = {k.replace("class_embed_proj.", "text_proj."): v for k, v in head.state_dict().items()}
    assert "text_proj.weight" in old
    fresh = TextClassHead(C, D)
    fresh.load_state_dict(old)  # strict: every key mapped, none missing
    torch.testing.assert_close(fresh.class_embed_proj.weight, head.class_embed_proj.weight)
