"""Frozen CLIP text encoder (TMP text side) and the shared open_clip weight loading.

Everything runs offline with randomly initialised RN50 weights; the model is built once per test
session (segclip_d2.checkpoint.pretrained caches it).
"""

import copy
import logging
import socket

import pytest
import torch
from torch import nn

from segclip_d2.checkpoint import pretrained as weights
from segclip_d2.modeling.text_encoder import FrozenCLIPTextEncoder, TextEncoderMismatchError

LOVEDA = ["background", "building", "road", "water", "barren", "forest", "agriculture"]


pytestmark = pytest.mark.usefixtures("hub_offline")


@pytest.fixture
def encoder():
    return FrozenCLIPTextEncoder(model_name="RN50", pretrained="")


@pytest.fixture
def empty_caches(monkeypatch, tmp_path):
    """No locally cached CLIP weights anywhere, and a fresh resolution / warning memory."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(weights, "_RESOLVED", {})
    monkeypatch.setattr(weights, "_WARNED", set())


def test_output_shape_dtype_device(encoder):
    emb = encoder(LOVEDA)
    assert encoder.embed_dim == 1024
    assert emb.shape == (7, 1024)
    assert emb.dtype == torch.float32
    assert emb.device == torch.device("cpu")
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(7))
    # Different classes get different embeddings.
    assert torch.cdist(emb, emb).fill_diagonal_(1.0).min() > 1e-3


def test_deterministic_across_instances_and_global_seed(encoder):
    emb = encoder(LOVEDA)
    torch.manual_seed(1234)  # the random init must not depend on the global RNG
    other = FrozenCLIPTextEncoder(model_name="RN50", pretrained="")
    torch.testing.assert_close(other(LOVEDA), emb, rtol=0, atol=0)
    rebuilt = weights._build_architecture("RN50", quick_gelu=False)
    shared, _ = weights.load_open_clip_model("RN50", "")
    assert torch.equal(rebuilt.token_embedding.weight, shared.token_embedding.weight)
    assert torch.equal(rebuilt.visual.conv1.weight, shared.visual.conv1.weight)


def test_cache_runs_encoder_once_per_vocabulary(encoder):
    first = encoder(LOVEDA)
    again = encoder(LOVEDA)
    assert encoder.num_encoder_calls == 1
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    # Reordered or partial vocabularies reuse the cached prompts.
    subset = encoder(["water", "building"])
    assert encoder.num_encoder_calls == 1
    torch.testing.assert_close(subset, first[[3, 1]], rtol=0, atol=0)
    # A new vocabulary runs the transformer again, once for all new prompts.
    isaid = encoder(["ship", "storage_tank", "building"])
    assert encoder.num_encoder_calls == 2
    assert isaid.shape == (3, 1024)
    torch.testing.assert_close(isaid[2], first[1], rtol=0, atol=0)
    # Clearing the cache forces a new run.
    encoder.clear_cache()
    encoder(LOVEDA)
    assert encoder.num_encoder_calls == 3


def test_returned_tensor_is_not_the_cache(encoder):
    emb = encoder(LOVEDA)
    expected = emb.clone()
    emb.zero_()
    torch.testing.assert_close(encoder(LOVEDA), expected, rtol=0, atol=0)


def test_prompts_use_template_and_clean_names(encoder):
    assert encoder.prompts(["small_vehicle", "Ground-Track-Field"]) == [
        "a photo with a small vehicle",
        "a photo with a Ground Track Field",
    ]
    torch.testing.assert_close(
        encoder(["small_vehicle"]), encoder(["small vehicle"]), rtol=0, atol=0
    )
    custom = FrozenCLIPTextEncoder(pretrained="", prompt_template="an aerial image of {}.")
    assert custom.prompts(["low_vegetation"]) == ["an aerial image of low vegetation."]
    assert not torch.allclose(custom(["road"]), encoder(["road"]))
    with pytest.raises(ValueError, match="exactly one"):
        FrozenCLIPTextEncoder(pretrained="", prompt_template="no placeholder")
    with pytest.raises(TypeError, match="sequence"):
        encoder("road")


def test_frozen_and_absent_from_state_dict(encoder):
    parent = nn.Module()
    parent.text = encoder
    parent.proj = nn.Linear(1024, 32)
    assert list(encoder.parameters()) == []
    assert encoder.state_dict() == {}
    assert set(parent.state_dict()) == {"proj.weight", "proj.bias"}
    out = parent.proj(parent.text(LOVEDA))  # gradients flow into the projection only
    out.sum().backward()
    assert parent.proj.weight.grad is not None
    shared, _ = weights.load_open_clip_model("RN50", "")
    assert not any(p.requires_grad for p in shared.parameters())
    assert all(p.grad is None for p in shared.parameters())


def test_stays_in_eval_mode(encoder):
    parent = nn.Sequential(encoder)
    parent.train()
    assert parent.training and not encoder.training
    encoder.train(True)
    assert not encoder.training
    assert not encoder._load().training


def test_follows_parent_device_and_keeps_shared_model_on_cpu(encoder):
    cpu = encoder(LOVEDA)
    parent = nn.Sequential(encoder)
    parent.to("meta")  # a non-CPU device available everywhere
    emb = encoder(LOVEDA)
    assert emb.device.type == "meta" and emb.shape == (7, 1024)
    assert encoder.num_encoder_calls == 2  # one run per device
    assert encoder._clip.obj.token_embedding.weight.device.type == "cpu"
    assert encoder._cache[(torch.device("cpu"), encoder.prompts(["road"])[0])].device.type == "cpu"
    assert torch.equal(encoder._cache[(torch.device("cpu"), encoder.prompts(["road"])[0])], cpu[2])


def test_deepcopy_shares_frozen_clip(encoder):
    encoder(LOVEDA)
    clone = copy.deepcopy(nn.Sequential(encoder))[0]
    assert clone._clip.obj is encoder._clip.obj
    torch.testing.assert_close(clone(LOVEDA), encoder(LOVEDA))


def test_from_config():
    from detectron2.config import get_cfg

    from segclip_d2.config import add_segclip_config

    cfg = add_segclip_config(get_cfg())
    cfg.MODEL.SEGCLIP.TEXT.PRETRAINED = ""
    cfg.MODEL.SEGCLIP.TEXT.PROMPT_TEMPLATE = "satellite photo of {}"
    enc = FrozenCLIPTextEncoder(cfg)
    assert enc.prompts(["road"]) == ["satellite photo of road"]
    assert enc.model_name == "RN50" and enc.weights_path is None and not enc.allow_mismatch


def test_offline_missing_weights_warn_once_and_random_init(empty_caches, caplog):
    with caplog.at_level(logging.WARNING, logger="segclip_d2.checkpoint.pretrained"):
        enc = FrozenCLIPTextEncoder(model_name="RN50", pretrained="openai")
        again = FrozenCLIPTextEncoder(model_name="RN50", pretrained="openai")
        enc(LOVEDA), again(LOVEDA)
    records = [r for r in caplog.records if r.name == "segclip_d2.checkpoint.pretrained"]
    assert len(records) == 1
    message = records[0].getMessage()
    assert "RN50" in message and "openai" in message and "RANDOMLY INITIALISED" in message
    assert "MODEL.SEGCLIP.TEXT.PRETRAINED" in message
    assert enc.weights_path is None and again.weights_path is None
    # The fallback is the same seeded random model as pretrained="".
    random_init = FrozenCLIPTextEncoder(model_name="RN50", pretrained="")
    torch.testing.assert_close(enc(LOVEDA), random_init(LOVEDA), rtol=0, atol=0)


def test_offline_missing_weights_required_is_a_clear_error(empty_caches):
    enc = FrozenCLIPTextEncoder(model_name="RN50", pretrained="openai", require_pretrained=True)
    assert not enc.loaded  # nothing is loaded before a prompt needs the tower
    with pytest.raises(weights.PretrainedWeightsError) as info:
        enc(LOVEDA)
    assert isinstance(info.value, RuntimeError)
    message = str(info.value)
    assert "'RN50'" in message and "'openai'" in message and "offline" in message
    assert "MODEL.SEGCLIP.TEXT.PRETRAINED=/path/to/file" in message
    assert "internet" in message


def test_unreachable_hub_fails_fast_without_download(empty_caches, monkeypatch):
    import huggingface_hub.constants
    import open_clip.pretrained

    monkeypatch.delenv("HF_HUB_OFFLINE")
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")

    def no_download(*args, **kwargs):
        raise AssertionError("the hub download (and its retry loop) must not be attempted")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", no_download)
    with pytest.raises(weights.PretrainedWeightsError, match="network is unreachable"):
        weights.load_open_clip_model("RN50", "openai", require_pretrained=True)


def test_probe_network_reports_reachability():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        assert weights._probe_network(f"http://127.0.0.1:{port}", timeout=1.0) is None
    reason = weights._probe_network(f"http://127.0.0.1:{port}", timeout=1.0)
    assert reason is not None and str(port) in reason


def test_bad_pretrained_values_are_errors(tmp_path, private_model_cache):
    with pytest.raises(weights.PretrainedWeightsError, match="neither an existing file"):
        FrozenCLIPTextEncoder(pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(weights.PretrainedWeightsError, match="yfcc15m"):
        FrozenCLIPTextEncoder(pretrained="not-a-tag")
    broken = tmp_path / "broken.pt"
    torch.save({"token_embedding.weight": torch.zeros(3, 3)}, broken)
    with pytest.raises(weights.PretrainedWeightsError, match="broken.pt"):
        FrozenCLIPTextEncoder(pretrained=str(broken))(LOVEDA)


def test_local_checkpoint_round_trip(tmp_path, private_model_cache):
    shared, _ = weights.load_open_clip_model("RN50", "")
    saved = copy.deepcopy(shared)
    with torch.no_grad():  # weights that differ from the seeded random init
        saved.token_embedding.weight.add_(torch.randn_like(saved.token_embedding.weight))
        saved.text_projection.mul_(2.0)
    path = tmp_path / "rn50_text.pt"
    torch.save(saved.state_dict(), path)

    enc = FrozenCLIPTextEncoder(model_name="RN50", pretrained=str(path))
    import open_clip

    tokens = open_clip.get_tokenizer("RN50")(enc.prompts(LOVEDA))
    with torch.no_grad():
        expected = saved.encode_text(tokens, normalize=True)
    emb = enc(LOVEDA)
    assert enc.weights_path == str(path)
    torch.testing.assert_close(emb, expected)
    random_init = FrozenCLIPTextEncoder(model_name="RN50", pretrained="")(LOVEDA)
    assert not torch.allclose(emb, random_init, atol=1e-3)


def test_torchscript_detection(tmp_path):
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(scripted))
    pickled = tmp_path / "state.pt"
    torch.save(nn.Linear(2, 2).state_dict(), pickled)
    assert weights.is_torchscript_archive(str(scripted))
    assert not weights.is_torchscript_archive(str(pickled))


def test_embeddings_are_open_clips_own_encode_text(encoder):
    """The encoder runs open_clip's text path itself: the same numbers as ``encode_text`` of the
    shared tower on the tokenised prompts, bit for bit."""
    import open_clip

    shared, _ = weights.load_open_clip_model("RN50", "")
    names = LOVEDA + ["ground track field next to a small vehicle"]
    tokens = open_clip.get_tokenizer("RN50")(encoder.prompts(names))  # (8, 77)
    with torch.no_grad():
        expected = shared.encode_text(tokens, normalize=True)
    torch.testing.assert_close(encoder(names), expected, rtol=0, atol=0)


class _ScriptableCLIP(nn.Module):
    """Holds a CLIP model's parameters under CLIP's names, scriptable (like OpenAI's RN50.pt)."""

    def __init__(self, clip: nn.Module, token_embedding: nn.Module):
        super().__init__()
        for name, child in clip.named_children():
            self.add_module(name, token_embedding if name == "token_embedding" else child)
        for name, param in clip.named_parameters(recurse=False):
            self.register_parameter(name, param)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_openai_torchscript_checkpoint(tmp_path, private_model_cache):
    shared, _ = weights.load_open_clip_model("RN50", "")
    token_embedding = copy.deepcopy(shared.token_embedding)
    with torch.no_grad():
        token_embedding.weight.add_(1.0)
    path = tmp_path / "RN50.pt"
    torch.jit.save(torch.jit.script(_ScriptableCLIP(shared, token_embedding)), str(path))

    enc = FrozenCLIPTextEncoder(model_name="RN50", pretrained=str(path))
    loaded = enc._load()
    assert enc.weights_path == str(path)
    assert torch.equal(loaded.token_embedding.weight, token_embedding.weight)
    assert torch.equal(loaded.ln_final.weight, shared.ln_final.weight)
    # OpenAI's TorchScript models are QuickGELU models.
    assert any(type(m).__name__ == "QuickGELU" for m in loaded.modules())
    assert not any(type(m).__name__ == "QuickGELU" for m in shared.modules())


def test_only_the_text_tower_is_kept(encoder):
    tower = encoder._load()
    assert "visual" not in dict(tower.named_children())
    assert not any(name.startswith("visual.") for name in tower.state_dict())


def test_stored_embeddings_need_no_tower(encoder):
    reference = encoder(LOVEDA)
    enc = FrozenCLIPTextEncoder(model_name="RN50", pretrained="openai", require_pretrained=True)
    enc.set_stored_embeddings(enc.prompts(LOVEDA), reference, {"pretrained": ""})
    torch.testing.assert_close(enc(LOVEDA), reference, rtol=0, atol=0)
    assert not enc.loaded and enc.num_encoder_calls == 0
    with pytest.raises(ValueError, match="expected \\(7, 1024\\)"):
        enc.set_stored_embeddings(enc.prompts(LOVEDA), reference[:, :5], None)


def test_loaded_tower_that_disagrees_with_stored_embeddings_is_an_error(encoder, caplog):
    reference = encoder(LOVEDA)
    made_by = encoder.identity()
    other = FrozenCLIPTextEncoder(model_name="RN50", pretrained="")
    other.set_stored_embeddings(other.prompts(LOVEDA), reference.flip(0), made_by)
    with pytest.raises(TextEncoderMismatchError) as info:
        other(["harbour"])  # a new prompt loads the tower, which re-encodes the stored ones
    message = str(info.value)
    assert message.count("open_clip 'RN50' pretrained ''") == 2 and "random init" in message
    assert "--allow-text-mismatch" in message
    same = FrozenCLIPTextEncoder(model_name="RN50", pretrained="")
    same.set_stored_embeddings(same.prompts(LOVEDA), reference, made_by)
    assert same(["harbour"]).shape == (1, 1024)  # agreeing encoders pass the check
    allowed = FrozenCLIPTextEncoder(model_name="RN50", pretrained="", allow_mismatch=True)
    allowed.set_stored_embeddings(allowed.prompts(LOVEDA), reference.flip(0), made_by)
    with caplog.at_level(logging.WARNING, logger="segclip_d2.modeling.text_encoder"):
        allowed(["harbour"])
    assert "allow_mismatch" in caplog.text
    torch.testing.assert_close(allowed(LOVEDA), reference.flip(0), rtol=0, atol=0)


def test_a_datasets_own_prompts_replace_the_template_and_several_are_ensembled():
    """classes.yaml prompts reach the embeddings: a plain prompt is used as it is, "{}" is filled
    with the name, several prompts give the normalised mean; other classes keep the template."""
    own = {"tree": ["a tree", "woodland"], "water": ["{} seen from above"]}
    enc = FrozenCLIPTextEncoder(pretrained="", class_prompts=own)
    plain = FrozenCLIPTextEncoder(pretrained="")
    assert enc.prompts(["water", "road"]) == ["water seen from above", "a photo with a road"]
    emb = enc(["tree", "water", "road"])  # (3, D)
    parts = plain._encode(["a tree", "woodland"], torch.device("cpu"))
    ensemble = torch.nn.functional.normalize(parts.mean(0), dim=0)
    torch.testing.assert_close(emb[0], ensemble, rtol=0, atol=1e-6)
    torch.testing.assert_close(emb[1], plain._encode(["water seen from above"], emb.device)[0])
    torch.testing.assert_close(emb[2], plain(["road"])[0])
    assert not torch.allclose(emb[0], plain(["tree"])[0], atol=1e-3)


def test_prompts_come_from_the_training_datasets_metadata():
    from detectron2.config import get_cfg
    from detectron2.data import MetadataCatalog

    from segclip_d2 import add_segclip_config

    name = "prompted_test_train"
    if name not in MetadataCatalog.list():
        MetadataCatalog.get(name).set(
            stuff_classes=["tree", "road"], prompts=[["a tree", "woodland"], ["road"]]
        )
    cfg = get_cfg()
    add_segclip_config(cfg)
    cfg.DATASETS.TRAIN = (name,)
    cfg.MODEL.SEGCLIP.TEXT.PRETRAINED = ""
    enc = FrozenCLIPTextEncoder(cfg)
    # the class whose only prompt is its name keeps the template
    assert enc.prompts(["tree", "road"]) == ["a tree | woodland", "a photo with a road"]
