"""Weight loading for open_clip models, shared by the text encoder and the CLIP ResNet backbone.

``pretrained`` is one of

* ``""`` — random initialisation (seeded, so every process builds the same weights; the fallback
  for missing weights is this same model);
* an open_clip pretrained tag (``"openai"``, ``"yfcc15m"`` ...) — fetched through open_clip's
  normal Hugging Face hub path when online; when offline (``HF_HUB_OFFLINE=1`` or
  ``TRANSFORMERS_OFFLINE=1``) or when the hub cannot be reached, only the local caches are looked
  at (no retry loop);
* a path to a local checkpoint: an open_clip state dict (``.bin``/``.pth``/``.pt``/``.safetensors``,
  as loaded by ``open_clip.load_checkpoint``) or an OpenAI CLIP TorchScript file (``RN50.pt``).
  OpenAI's models use QuickGELU: a TorchScript file switches it on by itself, but for a state-dict
  copy of OpenAI weights (e.g. the hub's ``open_clip_pytorch_model.bin``) name the model
  ``RN50-quickgelu`` (a tag sets it from open_clip's pretrained config).

Weights that a tag names but that cannot be found give ONE warning per process and random
initialisation, or — with ``require_pretrained=True`` — a :class:`PretrainedWeightsError` saying how
to fix it. A path that does not exist, an unknown tag or an unreadable file is always an error.

Built models are cached per process (building RN50 takes about a second and 400 MB), frozen and in
eval mode. They are shared: callers must not modify them (copy what you train).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import os
import socket
import threading
import urllib.parse
import zipfile
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Seed of the random initialisation: a frozen, randomly initialised text encoder is not saved in
# checkpoints, so every process must rebuild exactly the same weights.
RANDOM_INIT_SEED = 0
# Seconds allowed to open a TCP connection to the hub (or proxy) before calling it unreachable.
NETWORK_PROBE_TIMEOUT = 2.0

_TRUE_VALUES = {"1", "true", "yes", "on"}


class PretrainedWeightsError(RuntimeError):
    """Requested open_clip weights cannot be found or loaded."""


@dataclass(frozen=True)
class _Resolution:
    path: str | None  # local file to load, None = random init
    quick_gelu: bool  # architecture flag the weights were trained with
    reason: str | None = None  # why a requested tag's weights are missing
    hub_file: str = ""  # where the tag's weights live on the hub (for messages)


_MODELS: dict[tuple[str, str | None, bool, bool], nn.Module] = {}
_RESOLVED: dict[tuple[str, str], _Resolution] = {}
_WARNED: set[tuple[str, str, str]] = set()
_LOCK = threading.RLock()


def is_offline() -> bool:
    """True when the Hugging Face hub must not be contacted (read at call time, not import time)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE_VALUES:
            return True
    return False


def clear_cache() -> None:
    """Forget every built model, resolution and warning of this process."""
    with _LOCK:
        _MODELS.clear()
        _RESOLVED.clear()
        _WARNED.clear()


def is_torchscript_archive(path: str) -> bool:
    """True for a TorchScript zip (such as OpenAI's ``RN50.pt``), False for pickled state dicts."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


def _probe_network(url: str, timeout: float = NETWORK_PROBE_TIMEOUT) -> str | None:
    """Try a TCP connection to ``url``'s host (or the HTTPS proxy). None if it works, else why not.

    Runs in a daemon thread so a hanging DNS lookup cannot block longer than ``timeout``.
    """
    proxy = next(
        (
            os.environ[v]
            for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
            if os.environ.get(v)
        ),
        "",
    )
    target = urllib.parse.urlsplit(proxy or url)
    host = target.hostname
    if not host:
        return f"cannot parse a host from {proxy or url!r}"
    port = target.port or (443 if target.scheme == "https" else 80)
    outcome: dict[str, object] = {}

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome["ok"] = True
        except OSError as e:
            outcome["error"] = e

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout)
    if outcome.get("ok"):
        return None
    if "error" in outcome:
        return f"cannot reach {host}:{port} ({outcome['error']})"
    return f"no answer from {host}:{port} within {timeout:.0f} s"


def _hub_location(tag_cfg: dict) -> tuple[str, list[str]]:
    """(repo id, candidate file names, safetensors first) of a tag's hub entry ("" if none)."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    hub = tag_cfg.get("hf_hub", "")
    if not hub:
        return "", []
    repo_id, filename = os.path.split(hub)
    filename = filename or HF_WEIGHTS_NAME
    candidates = [filename]
    if filename == HF_WEIGHTS_NAME:
        candidates.insert(0, HF_SAFE_WEIGHTS_NAME)
    elif filename.endswith((".bin", ".pth")):
        candidates.insert(0, filename[:-4] + ".safetensors")
    return repo_id, candidates


def _find_in_local_caches(tag_cfg: dict) -> str | None:
    """The tag's weights file from the Hugging Face cache or open_clip's URL cache, if present."""
    if tag_cfg.get("file") and os.path.isfile(tag_cfg["file"]):
        return tag_cfg["file"]
    repo_id, candidates = _hub_location(tag_cfg)
    if repo_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in candidates:
            found = try_to_load_from_cache(repo_id, filename)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    url = tag_cfg.get("url", "")
    if url:
        # open_clip's download_pretrained_from_url caches under ~/.cache/clip/<basename>.
        local = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(local):
            return local
    return None


def _download(tag_cfg: dict) -> tuple[str | None, str | None]:
    """Fetch a tag's weights through open_clip's normal path: (path, None) or (None, reason)."""
    from open_clip.pretrained import download_pretrained

    repo_id, _ = _hub_location(tag_cfg)
    if repo_id:
        from huggingface_hub import constants

        probe_url = constants.ENDPOINT
    else:
        probe_url = tag_cfg.get("url", "")
    unreachable = _probe_network(probe_url)
    if unreachable:
        return None, f"the network is unreachable: {unreachable}"
    try:
        path = download_pretrained(tag_cfg)
    except Exception as e:  # noqa: BLE001 - any download failure becomes "unavailable" + reason
        return None, f"the download failed: {type(e).__name__}: {str(e)[:300]}"
    if not path or not os.path.isfile(path):
        return None, "the download returned no file"
    return path, None


def resolve_pretrained(model_name: str, pretrained: str) -> _Resolution:
    """Turn a ``pretrained`` value into a local file (or None with the reason it is missing).

    Raises :class:`PretrainedWeightsError` when ``pretrained`` is neither a known tag of
    ``model_name`` nor an existing file.
    """
    import open_clip

    pretrained = pretrained.strip()
    if not pretrained:
        return _Resolution(path=None, quick_gelu=False)
    local = os.path.expanduser(pretrained)
    if os.path.isfile(local):
        return _Resolution(path=local, quick_gelu=is_torchscript_archive(local))
    check_pretrained_value(model_name, pretrained)
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    repo_id, candidates = _hub_location(tag_cfg)
    hub_file = f"{repo_id}/{candidates[-1]}" if repo_id else tag_cfg.get("url", "")
    if is_offline():
        path = _find_in_local_caches(tag_cfg)
        reason = None if path else "offline mode (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set)"
    else:
        path, reason = _download(tag_cfg)
        if path is None:
            path = _find_in_local_caches(tag_cfg)
    if path is not None:
        reason = None
    return _Resolution(path=path, quick_gelu=quick_gelu, reason=reason, hub_file=hub_file)


def _build_architecture(model_name: str, quick_gelu: bool) -> nn.Module:
    """A randomly initialised (seeded) open_clip CLIP model of ``model_name``, on the CPU."""
    import open_clip
    from open_clip.model import CLIP, CustomTextCLIP

    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise ValueError(
            f"unknown open_clip model name '{model_name}' (known: {open_clip.list_models()})"
        )
    model_cfg = copy.deepcopy(model_cfg)
    if "multimodal_cfg" in model_cfg:
        raise ValueError(f"open_clip model '{model_name}' is a CoCa model; use a CLIP model")
    if quick_gelu:
        model_cfg["quick_gelu"] = True
    # Never let the constructor fetch tower weights of its own (timm / HF text models).
    model_cfg["vision_cfg"]["timm_model_pretrained"] = False
    model_cfg["text_cfg"]["hf_model_pretrained"] = False
    custom_text = model_cfg.pop("custom_text", False) or "hf_model_name" in model_cfg["text_cfg"]
    model_class = CustomTextCLIP if custom_text else CLIP
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return model_class(**model_cfg)


def _load_checkpoint(model: nn.Module, path: str, model_name: str) -> None:
    """Load a local checkpoint file into ``model`` (strict), naming the file on failure."""
    import open_clip

    try:
        if is_torchscript_archive(path):
            # OpenAI's TorchScript files use the same parameter names as open_clip's CLIP.
            state_dict = torch.jit.load(path, map_location="cpu").state_dict()
            for key in ("input_resolution", "context_length", "vocab_size"):
                state_dict.pop(key, None)
            model.load_state_dict(state_dict, strict=True)
        else:
            open_clip.load_checkpoint(model, path, strict=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise PretrainedWeightsError(
            f"{path}: cannot load it as the weights of open_clip model '{model_name}': "
            f"{type(e).__name__}: {str(e)[:500]}"
        ) from e


def _missing_message(
    model_name: str, pretrained: str, res: _Resolution, user: str, config_key: str
) -> str:
    return (
        f"Pretrained weights '{pretrained}' of open_clip model '{model_name}' (for the {user}) "
        f"are not available: {res.reason}."
        + (f" They are published as {res.hub_file}." if res.hub_file else "")
        + f" To fix it: run once with internet access (open_clip stores them in the Hugging Face "
        f"cache), or copy the checkpoint file (open_clip state dict, .safetensors or OpenAI "
        f"TorchScript .pt) to this machine and set {config_key}=/path/to/file."
    )


def without_visual_tower(model: nn.Module) -> nn.Module:
    """A shallow copy of an open_clip CLIP model that no longer references its image tower
    (shares every text-side parameter with ``model``)."""
    trimmed = copy.copy(model)
    trimmed._modules = {k: v for k, v in model._modules.items() if k != "visual"}
    trimmed._parameters = dict(model._parameters)
    trimmed._buffers = dict(model._buffers)
    return trimmed


@functools.lru_cache(maxsize=8)
def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file (cached per path for the process: weights files do not change)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def check_pretrained_value(model_name: str, pretrained: str) -> None:
    """Cheap validation of a ``pretrained`` value without loading or downloading anything:
    a path-like value must exist and a tag must be one of ``model_name``'s. Raises
    :class:`PretrainedWeightsError` otherwise."""
    import open_clip

    pretrained = (pretrained or "").strip()
    if not pretrained or os.path.isfile(os.path.expanduser(pretrained)):
        return
    if not open_clip.get_pretrained_cfg(model_name, pretrained):
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise PretrainedWeightsError(
            f"pretrained={pretrained!r} for open_clip model '{model_name}' is neither an existing "
            f"file nor a known pretrained tag (tags of this model: {tags or 'none'}). Give the "
            f"path of a checkpoint file, a tag, or '' for random initialisation."
        )


def embed_dim_of(model_name: str) -> int:
    """D, the joint embedding width of open_clip model ``model_name``, from its config (no
    weights are built)."""
    import open_clip

    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise ValueError(
            f"unknown open_clip model name '{model_name}' (known: {open_clip.list_models()})"
        )
    return int(model_cfg["embed_dim"])


def _resolve_or_warn(model_name, pretrained, require, user, config_key, require_key) -> _Resolution:
    """The (cached) resolution of a tag; a missing tag's weights raise with ``require``, else
    warn once per model, tag and config key (the caller holds ``_LOCK``)."""
    key = (model_name, pretrained)
    res = _RESOLVED.get(key)
    if res is None:
        res = resolve_pretrained(model_name, pretrained)
        _RESOLVED[key] = res
    if pretrained and res.path is None:
        message = _missing_message(model_name, pretrained, res, user, config_key)
        if require:
            raise PretrainedWeightsError(message)
        if (*key, config_key) not in _WARNED:
            _WARNED.add((*key, config_key))
            logger.warning(
                f"{message} Continuing with RANDOMLY INITIALISED weights (set {require_key}="
                "True to make this an error)."
            )
    return res


def load_open_clip_model(
    model_name: str,
    pretrained: str,
    *,
    require_pretrained: bool = False,
    user: str = "model",
    config_key: str = "PRETRAINED",
    require_key: str = "REQUIRE_PRETRAINED",
    text_only: bool = False,
) -> tuple[nn.Module, str | None]:
    """Build (or reuse) a frozen, eval-mode open_clip CLIP model with the requested weights.

    Args:
        model_name: open_clip model name ("RN50").
        pretrained: tag, local checkpoint path, or "" (random init); see the module docstring.
        require_pretrained: raise :class:`PretrainedWeightsError` instead of warning and falling
            back to random initialisation when a tag's weights cannot be found.
        user, config_key, require_key: named in messages ("text encoder",
            "MODEL.SEGCLIP.TEXT.PRETRAINED", "MODEL.SEGCLIP.TEXT.REQUIRE_PRETRAINED").
        text_only: return the model without its image tower. The full model is then not kept
            (unless another caller already built it): only the text side stays in memory.

    Returns:
        (model, path of the loaded weights or None for random init). The model is shared by every
        caller of this process: never modify it (deep-copy what is trained).
    """
    pretrained = (pretrained or "").strip()
    with _LOCK:
        res = _resolve_or_warn(model_name, pretrained, require_pretrained, user, config_key,
                               require_key)  # fmt: skip
        # Random init (requested or as fallback) is always the same model: a run that fell back
        # to it can be evaluated with pretrained="" and gets identical frozen text embeddings.
        quick_gelu = res.quick_gelu if res.path is not None else False
        model_key = (model_name, res.path, quick_gelu, text_only)
        model = _MODELS.get(model_key)
        if model is None:
            full = _MODELS.get((model_name, res.path, quick_gelu, False))
            if full is None:
                # Random init builds the image tower too (it draws from the seeded RNG first, so
                # the text weights stay those of the full model); it is dropped right after.
                full = _build_architecture(model_name, quick_gelu)
                if res.path is not None:
                    _load_checkpoint(full, res.path, model_name)
                    logger.info(f"Loaded open_clip '{model_name}' weights from {res.path}")
                full.eval()
                full.requires_grad_(False)
                if not text_only:
                    _MODELS[model_key] = full
            model = without_visual_tower(full) if text_only else full
            del full
            _MODELS[model_key] = model
    return model, res.path
