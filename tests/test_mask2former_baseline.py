"""The "no text queries" baseline: Mask2Former's decoder with learnable queries, registered in
TRANSFORMER_DECODER_REGISTRY and chosen by MODEL.SEGCLIP.TRANSFORMER_DECODER_NAME alone."""

import math

import pytest
import torch
from detectron2.modeling import build_model
from test_model_segclip import _image, _train_input, tiny_cfg  # tests/ is on sys.path
from test_train import REPO, TINY_OPTS, _train, tiny_synthetic  # noqa: F401  (fixture)

from segclip_d2.config import load_config
from segclip_d2.modeling.transformer_decoder import (
    TRANSFORMER_DECODER_REGISTRY,
    Mask2FormerTransformerDecoder,
    SegCLIPTransformerDecoder,
)

BASELINE = "Mask2FormerTransformerDecoder"


def test_registry_names_both_decoders_and_default_is_segclip():
    assert TRANSFORMER_DECODER_REGISTRY.get(BASELINE) is Mask2FormerTransformerDecoder
    cfg = tiny_cfg()
    assert cfg.MODEL.SEGCLIP.TRANSFORMER_DECODER_NAME == "SegCLIPTransformerDecoder"
    torch.manual_seed(0)
    assert type(build_model(cfg).transformer_decoder) is SegCLIPTransformerDecoder


def test_baseline_builds_runs_forward_and_backward():
    torch.manual_seed(0)
    cfg = tiny_cfg(TRANSFORMER_DECODER_NAME=BASELINE, **{"GT_GUIDANCE.ENABLED": False})
    model = build_model(cfg)
    dec = model.transformer_decoder
    assert type(dec) is Mask2FormerTransformerDecoder
    assert model.text_encoder is None and model.text_embeddings() is None  # no CLIP at all
    keys = set(model.state_dict())
    # learnable queries instead of text queries, no CFF
    prefix = "transformer_decoder."
    assert {prefix + "query_feat.weight", prefix + "query_embed.weight"} <= keys
    assert not any(k.startswith((prefix + "text_queries.", prefix + "cff.")) for k in keys)
    model.train()
    losses = model([_train_input(64, 64, [0, 2, 5]), _train_input(64, 64, [1], seed=1)])
    total = sum(losses.values())
    assert math.isfinite(float(total.detach()))
    total.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []  # DDP sees no unused parameters
    model.eval()
    with torch.no_grad():
        out = model([{"image": _image(61, 90)}])[0]["sem_seg"]
    assert out.shape == (7, 61, 90) and torch.isfinite(out).all()


def test_baseline_rejects_ground_truth_guidance_when_built():
    with pytest.raises(ValueError, match="GT_GUIDANCE.ENABLED"):
        build_model(tiny_cfg(TRANSFORMER_DECODER_NAME=BASELINE))  # GTG on by default


def test_baseline_with_the_text_class_head_builds_the_text_encoder():
    torch.manual_seed(0)
    cfg = tiny_cfg(
        TRANSFORMER_DECODER_NAME=BASELINE, CLASS_HEAD="text", **{"GT_GUIDANCE.ENABLED": False}
    )
    model = build_model(cfg).eval()
    assert model.text_encoder is not None and model.transformer_decoder.needs_text
    with torch.no_grad():
        assert model([{"image": _image(64, 64)}])[0]["sem_seg"].shape == (7, 64, 64)


@pytest.mark.slow
def test_baseline_config_trains_on_the_synthetic_set(tiny_synthetic, tmp_path):  # noqa: F811
    cfg = load_config(str(REPO / "configs" / "synthetic" / "mask2former_baseline_cpu.yaml"))
    cfg.merge_from_list(
        TINY_OPTS
        + ["OUTPUT_DIR", str(tmp_path), "SOLVER.MAX_ITER", "30", "SOLVER.BASE_LR", "0.002"]
        + ["SOLVER.LR_SCHEDULER_NAME", "WarmupMultiStepLR", "SOLVER.STEPS", "()"]
        + ["INPUT.RANDOM_VFLIP", "False", "INPUT.RANDOM_ROTATE90", "False"]
    )
    assert cfg.MODEL.SEGCLIP.TRANSFORMER_DECODER_NAME == BASELINE
    trainer, losses = _train(cfg)
    assert type(trainer.model.transformer_decoder) is Mask2FormerTransformerDecoder
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, f"loss did not fall clearly: {first:.2f} -> {last:.2f}"
