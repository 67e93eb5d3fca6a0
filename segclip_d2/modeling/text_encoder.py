"""Frozen CLIP text encoder of the Text Mapping Prompt (TMP).

Class names become prompts (``"a photo with a {}"`` filled with the cleaned class name), are
tokenised with the open_clip tokenizer of the model and encoded by the frozen CLIP text transformer.
The (K, D) embeddings are cached per prompt and device, so inference runs the transformer once per
vocabulary, never per image. The learnable projection to the decoder width lives in the model, not
here: this module owns no trainable parameter and nothing of it is saved in checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Sequence

import torch
from detectron2.config import configurable
from torch import nn

from segclip_d2.data.dataset_facts import prompt_name
from segclip_d2.utils.weights import load_open_clip_model

logger = logging.getLogger(__name__)

__all__ = ["FrozenCLIPTextEncoder"]

_TOKENIZERS: dict[str, object] = {}


def _get_tokenizer(model_name: str):
    """open_clip's tokenizer of ``model_name``, built once per process."""
    tokenizer = _TOKENIZERS.get(model_name)
    if tokenizer is None:
        import open_clip

        tokenizer = open_clip.get_tokenizer(model_name)
        _TOKENIZERS[model_name] = tokenizer
    return tokenizer


class _Shared:
    """Holds a frozen object shared by every copy of the owner: ``deepcopy`` keeps the reference
    (copying a model that holds the text encoder must not duplicate 400 MB of frozen CLIP)."""

    def __init__(self, obj):
        self.obj = obj

    def __deepcopy__(self, memo):
        return self


def _without_visual_tower(model: nn.Module) -> nn.Module:
    """A shallow copy of an open_clip CLIP model that no longer references its image tower."""
    trimmed = copy.copy(model)
    trimmed._modules = {k: v for k, v in model._modules.items() if k != "visual"}
    trimmed._parameters = dict(model._parameters)
    trimmed._buffers = dict(model._buffers)
    return trimmed


def _encode_text(model: nn.Module, tokens: torch.Tensor, normalize: bool) -> torch.Tensor:
    """``model.encode_text(tokens)``: (P, L) int64 -> (P, D).

    CLIP's text transformer is causal and pools at the end-of-text token (the largest token id),
    so positions after the last end-of-text token of the batch cannot change the result: they are
    cut off, which makes short class prompts ~8x cheaper than running all 77 positions. Other text
    towers run ``encode_text`` unchanged.
    """
    from open_clip.model import CLIP

    causal_argmax = (
        isinstance(model, CLIP)
        and model.text_pool_type == "argmax"
        and model.attn_mask is not None
        and tokens.device.type != "meta"
    )
    if not causal_argmax:
        return model.encode_text(tokens, normalize=normalize)
    eot = tokens.argmax(dim=-1)  # (P,) position of the end-of-text token
    length = int(eot.max()) + 1
    tokens = tokens[:, :length]  # (P, L')
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)  # (P, L', W)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), eot]  # (P, W)
    if isinstance(model.text_projection, nn.Linear):
        x = model.text_projection(x)
    elif model.text_projection is not None:
        x = x @ model.text_projection  # (P, D)
    return nn.functional.normalize(x, dim=-1) if normalize else x


class FrozenCLIPTextEncoder(nn.Module):
    """Frozen open_clip text tower: class names -> (K, D) float32 prompt embeddings.

    The CLIP weights are not registered as parameters or buffers: they never appear in
    ``state_dict()``, never require gradients and stay in eval mode whatever ``.train()`` says.
    The module still follows ``.to(device)`` of its parent through an empty, non-persistent buffer
    used as a device anchor; the text tower is copied to a new device lazily on first use there.

    Attributes:
        embed_dim: D, the CLIP joint embedding width (1024 for RN50).
        num_encoder_calls: number of actual transformer runs (one per batch of new prompts).
        weights_path: file the CLIP weights were loaded from, None for random initialisation.
    """

    @configurable
    def __init__(
        self,
        model_name: str = "RN50",
        pretrained: str = "openai",
        require_pretrained: bool = False,
        prompt_template: str = "a photo with a {}",
        normalize: bool = True,
    ):
        """
        Args:
            model_name: open_clip model name.
            pretrained: open_clip pretrained tag, local checkpoint path, or "" for random init
                (see :mod:`segclip_d2.utils.weights` for the offline rules).
            require_pretrained: raise instead of warning + random init when a tag's weights are
                missing.
            prompt_template: prompt with one "{}" replaced by the cleaned class name.
            normalize: L2-normalise the embeddings (CLIP's joint-space convention).
        """
        super().__init__()
        if prompt_template.count("{}") != 1:
            raise ValueError(
                f"prompt template {prompt_template!r} must contain exactly one '{{}}' for the "
                "class name"
            )
        self.model_name = model_name
        self.pretrained = pretrained
        self.prompt_template = prompt_template
        self.normalize = normalize
        clip_model, self.weights_path = load_open_clip_model(
            model_name,
            pretrained,
            require_pretrained=require_pretrained,
            user="text encoder",
            config_key="MODEL.SEGCLIP.TEXT.PRETRAINED",
            require_key="MODEL.SEGCLIP.TEXT.REQUIRE_PRETRAINED",
        )
        self._clip = _Shared(clip_model)  # shared, frozen, CPU
        self._towers: dict[torch.device, _Shared] = {}  # frozen text tower per device
        self._cache: dict[tuple[torch.device, str], torch.Tensor] = {}  # (D,) per prompt
        self.context_length = int(clip_model.context_length)
        with torch.no_grad():
            probe = _encode_text(clip_model, torch.zeros(1, self.context_length).long(), False)
        self.embed_dim = int(probe.shape[-1])
        self.num_encoder_calls = 0
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)
        super().train(False)

    @classmethod
    def from_config(cls, cfg) -> dict:
        return {
            "model_name": cfg.MODEL.SEGCLIP.TEXT.MODEL_NAME,
            "pretrained": cfg.MODEL.SEGCLIP.TEXT.PRETRAINED,
            "require_pretrained": cfg.MODEL.SEGCLIP.TEXT.REQUIRE_PRETRAINED,
            "prompt_template": cfg.MODEL.SEGCLIP.TEXT.PROMPT_TEMPLATE,
        }

    @property
    def device(self) -> torch.device:
        return self._device_anchor.device

    def train(self, mode: bool = True):
        """Always eval: the frozen encoder has no training behaviour (``mode`` is ignored)."""
        return super().train(False)

    def prompts(self, class_names: Sequence[str]) -> list[str]:
        """The prompt of each class name, e.g. "small_vehicle" -> "a photo with a small vehicle"."""
        if isinstance(class_names, str):
            raise TypeError(
                f"class_names must be a sequence of names, got the string {class_names!r}"
            )
        return [self.prompt_template.replace("{}", prompt_name(str(n))) for n in class_names]

    def clear_cache(self) -> None:
        """Drop the cached embeddings (the next call encodes again)."""
        self._cache.clear()

    def _tower(self, device: torch.device) -> nn.Module:
        shared = self._towers.get(device)
        if shared is None:
            base = self._clip.obj
            if device.type == "cpu":
                tower = base
            else:
                tower = copy.deepcopy(_without_visual_tower(base)).to(device)
                tower.requires_grad_(False)
            shared = _Shared(tower.eval())
            self._towers[device] = shared
        return shared.obj

    @torch.no_grad()
    def _encode(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """Run the transformer on ``prompts``: (P, D) float32 on ``device``."""
        tokens = _get_tokenizer(self.model_name)(prompts, context_length=self.context_length)
        tokens = tokens.to(device)  # (P, 77)
        tower = self._tower(device)
        autocast_off = (
            torch.autocast(device_type=device.type, enabled=False)
            if device.type in ("cpu", "cuda")
            else contextlib.nullcontext()
        )
        with autocast_off:
            emb = _encode_text(tower, tokens, self.normalize).float()  # (P, D)
        self.num_encoder_calls += 1
        return emb

    def forward(self, class_names: Sequence[str]) -> torch.Tensor:
        """Embed the prompts of ``class_names``.

        Returns:
            (K, D) float32 on the module's device, K = len(class_names); a fresh tensor (the cache
            is not exposed to in-place edits). Only prompts never seen on this device run the
            transformer (in one batch).
        """
        prompts = self.prompts(class_names)
        device = self.device
        if not prompts:
            return torch.zeros(0, self.embed_dim, device=device)
        missing = [p for p in dict.fromkeys(prompts) if (device, p) not in self._cache]
        if missing:
            for prompt, row in zip(missing, self._encode(missing, device)):
                self._cache[(device, prompt)] = row
        return torch.stack([self._cache[(device, p)] for p in prompts])  # (K, D)

    def extra_repr(self) -> str:
        weights = self.weights_path or "random init"
        return (
            f"model_name={self.model_name!r}, weights={weights!r}, embed_dim={self.embed_dim}, "
            f"prompt_template={self.prompt_template!r}, normalize={self.normalize}"
        )
