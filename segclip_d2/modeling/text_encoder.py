"""Frozen CLIP text encoder of the Text Mapping Prompt (TMP).

Class names become prompts (``"a photo with a {}"`` filled with the cleaned class name), are
tokenised with the open_clip tokenizer of the model and encoded by the frozen CLIP text transformer
(open_clip's own ``encode_text``).
The (K, D) embeddings are cached per prompt and device, so inference runs the transformer once per
vocabulary, never per image. The learnable projection to the decoder width lives in the model, not
here: this module owns no trainable parameter and nothing of it is in ``state_dict()``.

The CLIP text tower is loaded lazily, on the first prompt that has no embedding yet, and without
the image tower. A trained checkpoint's model card carries the embeddings of its training prompts
(:meth:`FrozenCLIPTextEncoder.set_stored_embeddings`): predicting the training vocabulary then
never loads CLIP at all. When the tower is loaded anyway (a new vocabulary), it first re-encodes
the stored prompts; embeddings that differ from the stored ones raise
:class:`TextEncoderMismatchError` naming both encoders, unless ``allow_mismatch``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import nn

from segclip_d2.checkpoint.pretrained import (
    check_pretrained_value,
    embed_dim_of,
    file_sha256,
    load_open_clip_model,
    without_visual_tower,
)
from segclip_d2.config import PROMPT_TEMPLATE
from segclip_d2.data.dataset_facts import prompt_name

logger = logging.getLogger(__name__)

__all__ = ["FrozenCLIPTextEncoder", "TextEncoderMismatchError"]

# Largest |difference| between stored and re-encoded prompt embeddings (unit vectors) still
# counted as the same text encoder (float32 rounding of another CPU / thread count).
MISMATCH_TOLERANCE = 1e-4

_TOKENIZERS: dict[str, object] = {}


# Joins the prompts of a class with several (their embeddings are averaged); no prompt holds it.
PROMPT_SEPARATOR = " | "


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


class TextEncoderMismatchError(RuntimeError):
    """The loaded CLIP text tower does not reproduce the embeddings stored in a checkpoint."""


class FrozenCLIPTextEncoder(nn.Module):
    """Frozen open_clip text tower: class names -> (K, D) float32 prompt embeddings.

    The CLIP weights are not registered as parameters or buffers: they never appear in
    ``state_dict()``, never require gradients and stay in eval mode whatever ``.train()`` says.
    The module still follows ``.to(device)`` of its parent through an empty, non-persistent buffer
    used as a device anchor; the text tower is copied to a new device lazily on first use there.

    Attributes:
        embed_dim: D, the CLIP joint embedding width (1024 for RN50), known without loading.
        num_encoder_calls: number of actual transformer runs (one per batch of new prompts).
        weights_path: file the CLIP weights were loaded from, None for random initialisation
            or while the tower is not loaded.
        stored_identity: identity (:meth:`identity`) of the encoder that made the stored
            embeddings, None when there are none.
    """

    @configurable
    def __init__(
        self,
        model_name: str = "RN50",
        pretrained: str = "openai",
        require_pretrained: bool = False,
        prompt_template: str = PROMPT_TEMPLATE,
        normalize: bool = True,
        allow_mismatch: bool = False,
        class_prompts: Mapping[str, Sequence[str]] | None = None,
    ):
        """
        Args:
            model_name: open_clip model name.
            pretrained: open_clip pretrained tag, local checkpoint path, or "" for random init
                (see :mod:`segclip_d2.checkpoint.pretrained` for the offline rules). A path that
                does not exist or an unknown tag is an error at once; missing weights of a valid
                tag only matter when the tower is loaded.
            require_pretrained: raise instead of warning + random init when a tag's weights are
                missing (when the tower is loaded).
            prompt_template: prompt with one "{}" replaced by the cleaned class name.
            normalize: L2-normalise the embeddings (CLIP's joint-space convention).
            allow_mismatch: when the loaded tower disagrees with stored embeddings, warn and keep
                the stored ones for their prompts instead of raising.
            class_prompts: the dataset's own prompts of some classes (``classes.yaml`` of a
                custom dataset): ``{name: [prompt, ...]}``. A prompt with "{}" is a template for
                the name; several prompts give the normalised mean of their embeddings (CLIP's
                prompt ensembling). Other classes use ``prompt_template``.
        """
        super().__init__()
        if prompt_template.count("{}") != 1:
            raise ValueError(
                f"prompt template {prompt_template!r} must contain exactly one '{{}}' for the "
                "class name"
            )
        check_pretrained_value(model_name, pretrained)
        self.model_name = model_name
        self.pretrained = pretrained
        self.require_pretrained = require_pretrained
        self.prompt_template = prompt_template
        self.normalize = normalize
        self.allow_mismatch = allow_mismatch
        self.embed_dim = embed_dim_of(model_name)
        self.weights_path: str | None = None
        self._clip: _Shared | None = None  # shared, frozen, CPU text tower once loaded
        self._towers: dict[torch.device, _Shared] = {}  # frozen text tower per device
        self._cache: dict[tuple[torch.device, str], torch.Tensor] = {}  # (D,) per prompt
        self.class_prompts = {
            str(n): tuple(str(p) for p in ps) for n, ps in (class_prompts or {}).items() if ps
        }
        for name, ps in self.class_prompts.items():
            if any(PROMPT_SEPARATOR in p for p in ps):
                raise ValueError(f"class {name!r}: a prompt may not contain {PROMPT_SEPARATOR!r}")
        self._stored: dict[str, torch.Tensor] = {}  # (D,) CPU, from a model card
        self.stored_identity: dict | None = None
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
            "allow_mismatch": cfg.MODEL.SEGCLIP.TEXT.ALLOW_MISMATCH,
            "class_prompts": _dataset_prompts(cfg),
        }

    @property
    def device(self) -> torch.device:
        return self._device_anchor.device

    @property
    def loaded(self) -> bool:
        """Whether the CLIP text tower is in memory."""
        return self._clip is not None

    def train(self, mode: bool = True):
        """Always eval: the frozen encoder has no training behaviour (``mode`` is ignored)."""
        return super().train(False)

    def prompts(self, class_names: Sequence[str]) -> list[str]:
        """The prompt of each class name, e.g. "small_vehicle" -> "a photo with a small vehicle"."""
        if isinstance(class_names, str):
            raise TypeError(
                f"class_names must be a sequence of names, got the string {class_names!r}"
            )
        return [self._prompt(str(n)) for n in class_names]

    def _prompt(self, name: str) -> str:
        """One class's prompt; a class with several prompts gets them joined by
        ``PROMPT_SEPARATOR`` (its embedding is their ensemble, see :meth:`_encode`)."""
        own = self.class_prompts.get(name)
        if not own:
            return self.prompt_template.replace("{}", prompt_name(name))
        filled = [p.replace("{}", prompt_name(name)) for p in own]
        return PROMPT_SEPARATOR.join(filled)

    def clear_cache(self) -> None:
        """Drop the cached embeddings (the next call encodes again; stored ones stay)."""
        self._cache.clear()

    # ------------------------------------------------------------------ identity
    def identity(self) -> dict:
        """Which text encoder this is: open_clip model name, pretrained value, and the weights
        file's name and SHA-256 (loads the tower: the file is only known then)."""
        self._load()
        path = self.weights_path
        return {
            "open_clip_model": self.model_name,
            "pretrained": self.pretrained,
            "weights_file": os.path.basename(path) if path else None,
            "weights_sha256": file_sha256(path) if path else None,
            "random_init": path is None,
            "normalize": self.normalize,
        }

    @staticmethod
    def describe(identity: dict | None) -> str:
        """One-line description of an :meth:`identity` dict, for messages."""
        if not identity:
            return "unknown text encoder"
        if identity.get("random_init"):
            weights = "random init"
        else:
            sha = identity.get("weights_sha256") or "?"
            weights = f"{identity.get('weights_file')} sha256 {sha[:12]}"
        return (
            f"open_clip {identity.get('open_clip_model')!r} pretrained "
            f"{identity.get('pretrained')!r} ({weights})"
        )

    # ------------------------------------------------------------------ stored embeddings
    def set_stored_embeddings(
        self, prompts: Sequence[str], embeddings: torch.Tensor, identity: dict | None
    ) -> None:
        """Use ``embeddings`` (P, D) for ``prompts`` instead of running the tower (the model
        card of a checkpoint). If the tower is already loaded they are checked at once."""
        embeddings = torch.as_tensor(embeddings, dtype=torch.float32).detach().cpu()
        if embeddings.dim() != 2 or embeddings.shape != (len(prompts), self.embed_dim):
            raise ValueError(
                f"stored text embeddings have shape {tuple(embeddings.shape)}, expected "
                f"({len(prompts)}, {self.embed_dim}) for {len(prompts)} prompts of "
                f"open_clip model {self.model_name!r}"
            )
        self._stored = {str(p): row.clone() for p, row in zip(prompts, embeddings)}
        self.stored_identity = dict(identity) if identity else None
        self._cache.clear()
        if self.loaded:
            self._verify_stored()

    def _verify_stored(self) -> None:
        """Re-encode the stored prompts with the loaded tower and compare."""
        if not self._stored:
            return
        prompts = list(self._stored)
        fresh = self._encode(prompts, torch.device("cpu"))
        stored = torch.stack([self._stored[p] for p in prompts])
        diff = float((fresh - stored).abs().max())
        if diff <= MISMATCH_TOLERANCE:
            return
        message = (
            f"the text encoder loaded now ({self.describe(self.identity())}) does not reproduce "
            f"the class text embeddings stored in the checkpoint, made by "
            f"{self.describe(self.stored_identity)}: max |difference| {diff:.3g} over "
            f"{len(prompts)} prompts"
        )
        if not self.allow_mismatch:
            raise TextEncoderMismatchError(
                f"{message}. Point MODEL.SEGCLIP.TEXT.PRETRAINED at the weights the model was "
                "trained with, or pass --allow-text-mismatch (MODEL.SEGCLIP.TEXT.ALLOW_MISMATCH "
                "True) to use them anyway (stored embeddings for the training prompts)"
            )
        logger.warning("%s; continuing (allow_mismatch): stored embeddings are kept", message)

    # ------------------------------------------------------------------ the tower
    def _load(self) -> nn.Module:
        """The CPU text tower, loaded (text side only) on first use."""
        if self._clip is None:
            clip_model, self.weights_path = load_open_clip_model(
                self.model_name,
                self.pretrained,
                require_pretrained=self.require_pretrained,
                user="text encoder",
                config_key="MODEL.SEGCLIP.TEXT.PRETRAINED",
                require_key="MODEL.SEGCLIP.TEXT.REQUIRE_PRETRAINED",
                text_only=True,
            )
            self._clip = _Shared(clip_model)
            self._verify_stored()
        return self._clip.obj

    def _tower(self, device: torch.device) -> nn.Module:
        shared = self._towers.get(device)
        if shared is None:
            base = self._load()
            if device.type == "cpu":
                tower = base
            else:
                tower = copy.deepcopy(without_visual_tower(base)).to(device)
                tower.requires_grad_(False)
            shared = _Shared(tower.eval())
            self._towers[device] = shared
        return shared.obj

    @torch.no_grad()
    def _encode(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """(P, D) float32 embeddings of ``prompts`` on ``device``; a prompt made of several
        (joined by ``PROMPT_SEPARATOR``) gets the normalised mean of theirs."""
        parts = [p.split(PROMPT_SEPARATOR) for p in prompts]
        flat = [q for ps in parts for q in ps]
        emb = self._encode_texts(flat, device)  # (sum of parts, D)
        if len(flat) == len(prompts):
            return emb
        out, i = [], 0
        for ps in parts:
            mean = emb[i : i + len(ps)].mean(0)
            out.append(F.normalize(mean, dim=0) if self.normalize else mean)
            i += len(ps)
        return torch.stack(out)

    def _encode_texts(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """Run the transformer on ``prompts``: (P, D) float32 on ``device``."""
        tower = self._tower(device)
        context_length = int(tower.context_length)
        tokens = _get_tokenizer(self.model_name)(prompts, context_length=context_length)
        tokens = tokens.to(device)  # (P, 77)
        autocast_off = (
            torch.autocast(device_type=device.type, enabled=False)
            if device.type in ("cpu", "cuda")
            else contextlib.nullcontext()
        )
        with autocast_off:
            emb = tower.encode_text(tokens, normalize=self.normalize).float()  # (P, D)
        self.num_encoder_calls += 1
        return emb

    def forward(self, class_names: Sequence[str]) -> torch.Tensor:
        """Embed the prompts of ``class_names``.

        Returns:
            (K, D) float32 on the module's device, K = len(class_names); a fresh tensor (the cache
            is not exposed to in-place edits). Stored prompts use their stored embedding; only
            prompts never seen on this device run the transformer (in one batch).
        """
        prompts = self.prompts(class_names)
        device = self.device
        if not prompts:
            return torch.zeros(0, self.embed_dim, device=device)
        missing = [p for p in dict.fromkeys(prompts) if (device, p) not in self._cache]
        for p in [p for p in missing if p in self._stored]:
            self._cache[(device, p)] = self._stored[p].to(device)
        missing = [p for p in missing if p not in self._stored]
        if missing:
            for prompt, row in zip(missing, self._encode(missing, device)):
                self._cache[(device, prompt)] = row
        return torch.stack([self._cache[(device, p)] for p in prompts])  # (K, D)

    def extra_repr(self) -> str:
        if self.loaded:
            weights = self.weights_path or "random init"
        else:
            weights = f"not loaded ({self.pretrained or 'random init'})"
        stored = f", stored prompts={len(self._stored)}" if self._stored else ""
        return (
            f"model_name={self.model_name!r}, weights={weights!r}, embed_dim={self.embed_dim}, "
            f"prompt_template={self.prompt_template!r}, normalize={self.normalize}{stored}"
        )


def _dataset_prompts(cfg) -> dict[str, list[str]]:
    """The prompts a training dataset registers for its classes (custom datasets' classes.yaml);
    a class whose only prompt is its own name uses the template."""
    from detectron2.data import MetadataCatalog

    if not cfg.DATASETS.TRAIN or cfg.DATASETS.TRAIN[0] not in MetadataCatalog.list():
        return {}
    meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
    names, prompts = meta.get("stuff_classes", None), meta.get("prompts", None)
    if not names or not prompts or len(prompts) != len(names):
        return {}
    return {str(n): list(p) for n, p in zip(names, prompts) if list(p) != [str(n)]}
