"""ONNX export of a trained SegCLIP model, for onnxruntime and the Deepness QGIS plugin.

The exported graph maps one batch of normalised tiles to class probabilities:

* input ``image``: ``(B, C, S, S)`` float32, the model's C bands (RGB for an RGB model; the
  card's ``input.bands`` name them), ``(pixel / 255 - mean) / std`` with the
  ``standardization_mean`` / ``standardization_std`` of the metadata (0-1 scale; the same as
  ``(pixel - PIXEL_MEAN) / PIXEL_STD`` on the 0..255 scale). B is dynamic, S static (Deepness
  reads the tile size from the input shape);
* output ``probs``: ``(B, K, S, S)`` float32 class probabilities summing to 1 over K.

The output is at the input resolution S, not the stride-4 mask resolution: Deepness pastes an
output smaller than the tile as a centred crop (it does not resize), and the upsampling inside
the graph is cheap next to the network (K channels, done once), so every consumer gets
pixel-aligned probabilities without a resize step of its own. Inside, the graph is the model's
own post-processing (``SegCLIP.semantic_inference``), the scores divided by their sum over K
(argmax unchanged).

Only standard ONNX operators are used: the deformable attention runs through its
``grid_sample`` reference form (``GridSample``, opset >= 16), no custom op library. Every float
in the graph is float32 (:func:`float64_tensors` checks it: a float64 grid makes onnxruntime's
GridSample fail).
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
MIN_OPSET = 16  # GridSample
INPUT_NAME = "image"
OUTPUT_NAME = "probs"
# Deepness defaults written into the metadata (the user can change them in the plugin).
# Overlap of the plugin's tiles, percent. Measured with tools/benchmark_onnx.py --overlaps on
# 1024 px rasters at tile 512 (agreement of the plugin's class map with the project's own
# windows, LoveDA / synthetic): 10% 81.7/92.9, 15% 79.2/91.9, 25% 78.9/90.9, 33% 81.7/91.1,
# 50% 91.1/96.2. At 50% every pasted pixel is at least S/4 from its tile's edge and a raster of
# S + n*S/2 px needs no black padding; it costs ~2.9x the tiles of 15% on large rasters.
DEFAULT_TILES_OVERLAP_PERCENT = 50
# The output is a softmax over K classes: a threshold > 0 zeroes every probability below it and
# relabels a pixel where no class reaches it as class 0 (a real class). 0 turns that off.
DEFAULT_SEG_THRESH = 0.0
# The plugin's median filter of the class numbers (0: off, as the project's own prediction).
DEFAULT_SEG_SMALL_SEGMENT = 0


@contextlib.contextmanager
def export_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The plain model as the exporter must see it: standard PyTorch operations only.

    ``model`` must be plain (as built and loaded, never passed to
    :func:`~segclip_d2.predict.optimize.optimize_for_inference`: the CPU execution tricks are
    not part of the network). While tracing:

    * every ``MSDeformAttn`` uses its ``grid_sample`` reference (``impl="pytorch"``) instead of
      the compiled op, which ONNX runtimes do not have;
    * the model is in eval mode with autograd enabled and its parameters frozen, so the layers'
      no-autograd shortcuts (the compiled op's direct call, in-place softmax) stay out of the
      graph.

    Everything is restored on exit. Raises ValueError for an optimised model.
    """
    from segclip_d2.layers.ms_deform_attn import MSDeformAttn
    from segclip_d2.predict.optimize import optimized_transforms

    applied = optimized_transforms(model)
    if applied is not None:
        raise ValueError(
            f"export needs the plain model; this one was optimised for inference ({applied}): "
            "build and load it again without optimize_for_inference()"
        )
    impls = [(m, m.impl) for m in model.modules() if isinstance(m, MSDeformAttn)]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for m, _ in impls:
            m.impl = "pytorch"
        for p, _ in grads:
            p.requires_grad_(False)
        model.eval()
        with torch.enable_grad():
            yield model
    finally:
        for m, impl in impls:
            m.impl = impl
        for p, flag in grads:
            p.requires_grad_(flag)
        model.train(was_training)


class SegCLIPProbabilities(nn.Module):
    """``(B, C, S, S)`` normalised tiles -> ``(B, K, S, S)`` probabilities summing to 1.

    The class text embeddings of the current vocabulary are frozen into the module (a buffer),
    so the graph holds no text encoder.
    """

    def __init__(self, model: nn.Module, tile_size: int):
        super().__init__()
        d = int(model.size_divisibility)
        if tile_size <= 0 or (d > 1 and tile_size % d):
            raise ValueError(
                f"tile size {tile_size} must be a positive multiple of the model's size "
                f"divisibility {d} (e.g. {max(d, 1) * 16})"
            )
        self.model = model
        self.tile_size = int(tile_size)
        with torch.no_grad():
            emb = model.text_embeddings()  # (K, D), None without text encoder
            emb = None if emb is None else emb.detach().float().clone()
        self.register_buffer("text_embeddings", emb, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        size = (self.tile_size, self.tile_size)
        features = m.backbone(x)
        mask_features, multi_scale = m.pixel_decoder(features)
        out = m.transformer_decoder(multi_scale, mask_features, self.text_embeddings)
        probs = m.semantic_inference(out["pred_logits"], out["pred_masks"], size)  # (B, K, S, S)
        return probs / probs.sum(1, keepdim=True).clamp_min(1e-12)


def normalise(images: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """(B, C, H, W) bands (RGB 0..255 for an RGB model) -> the exported graph's input."""
    return (images.float() - model.pixel_mean.cpu()) / model.pixel_std.cpu()


def export_card(card: dict) -> dict:
    """The card to embed: a copy whose ``metrics`` belong to the weights it ships.

    A checkpoint's card holds the latest evaluation at save time, which may be older than its
    weights (``model_final.pth`` is written before the last evaluation runs). Metrics whose
    ``evaluated_at_iteration`` is not the weights' ``training.iteration`` (or unknown) are left
    out, and ``metrics_note`` says so.
    """
    card = dict(card)
    metrics = dict(card.get("metrics") or {})
    weights_it = (card.get("training") or {}).get("iteration")
    evaluated_it = metrics.get("evaluated_at_iteration")
    if metrics and (evaluated_it is None or weights_it is None or evaluated_it != weights_it):
        card["metrics"] = {}
        card["metrics_note"] = (
            f"left out: the checkpoint's metrics were evaluated at iteration {evaluated_it}, the "
            f"weights are from iteration {weights_it}; evaluate this checkpoint to know them"
        )
    return card


def deepness_metadata(
    card: dict,
    tile_size: int,
    class_names: list[str],
    resolution_cm: float | None,
    tiles_overlap: int = DEFAULT_TILES_OVERLAP_PERCENT,
) -> dict[str, str]:
    """The ``metadata_props`` of the exported file, every value JSON-encoded.

    ``resolution_cm`` (cm/px, None: unknown and not written) is what Deepness resamples the
    raster to before tiling; without it the plugin uses its UI default (3 cm/px).
    """
    inp = card["input"]
    meta = {
        "model_type": "Segmentor",
        "class_names": {str(i): name for i, name in enumerate(class_names)},
        "tile_size": int(tile_size),
        "tiles_size": int(tile_size),
        "tiles_overlap": int(tiles_overlap),
        "standardization_mean": [round(v / 255.0, 8) for v in inp["pixel_mean"]],
        "standardization_std": [round(v / 255.0, 8) for v in inp["pixel_std"]],
        "seg_thresh": DEFAULT_SEG_THRESH,
        "seg_small_segment": DEFAULT_SEG_SMALL_SEGMENT,
        "segclip_model_card": export_card(card),
    }
    if resolution_cm is not None:
        meta["resolution"] = round(float(resolution_cm), 6)
    return {k: json.dumps(v, separators=(",", ":")) for k, v in meta.items()}


def write_metadata(onnx_model, meta: dict[str, str]) -> None:
    """Replace the ``metadata_props`` of ``onnx_model`` (in memory) by ``meta``."""
    del onnx_model.metadata_props[:]
    for key, value in meta.items():
        entry = onnx_model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx_model.producer_name = "segclip-d2"
    onnx_model.doc_string = "SegCLIP semantic segmentation; see metadata segclip_model_card"


def check_contract(onnx_model, path: str) -> None:
    """RuntimeError when the graph breaks the contract (invalid, float64, non-standard ops)."""
    import onnx

    onnx.checker.check_model(onnx_model)
    doubles = float64_tensors(onnx_model)
    if doubles:
        raise RuntimeError(f"{path}: the graph has float64 tensors: {doubles[:10]}")
    custom = nonstandard_ops(onnx_model)
    if custom:
        raise RuntimeError(f"{path}: the graph uses non-standard operators: {custom}")


def float64_tensors(onnx_model) -> list[str]:
    """Names of float64 initializers, constants and casts in the graph (must be none)."""
    from onnx import TensorProto

    bad = [t.name for t in onnx_model.graph.initializer if t.data_type == TensorProto.DOUBLE]
    for node in onnx_model.graph.node:
        for attr in node.attribute:
            if attr.name == "value" and attr.t.data_type == TensorProto.DOUBLE:
                bad.append(node.name or node.op_type)
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.DOUBLE:
                bad.append(node.name or "Cast")
    for value in list(onnx_model.graph.value_info) + list(onnx_model.graph.output):
        if value.type.tensor_type.elem_type == TensorProto.DOUBLE:
            bad.append(value.name)
    return bad


def nonstandard_ops(onnx_model) -> list[str]:
    """Operators outside the default ONNX domain (a custom op library would be needed)."""
    return sorted(
        {
            f"{n.domain}::{n.op_type}"
            for n in onnx_model.graph.node
            if n.domain not in ("", "ai.onnx")
        }
    )


def export_onnx(
    model: nn.Module,
    card: dict,
    tile_size: int,
    output: str,
    opset: int = DEFAULT_OPSET,
    *,
    resolution_cm: float | None,
    tiles_overlap: int = DEFAULT_TILES_OVERLAP_PERCENT,
) -> dict[str, str]:
    """Trace ``model`` (its current vocabulary) into ``output``; check it and add the metadata
    (:func:`deepness_metadata`).

    Returns the metadata written. Raises ValueError for an unsupported opset or tile size, and
    RuntimeError when the exported graph breaks the contract (float64, non-standard ops).
    """
    import onnx

    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} has no GridSample; use --opset {MIN_OPSET} or later")
    head = SegCLIPProbabilities(model, tile_size)
    channels = int(model.pixel_mean.numel())
    bands = (card.get("input") or {}).get("bands")
    if bands is not None and len(bands) != channels:
        raise ValueError(f"the card names {len(bands)} bands, the model reads {channels}")
    dummy = torch.zeros(1, channels, tile_size, tile_size)
    with export_mode(model), warnings.catch_warnings():
        # the tracer warns about every Python int it bakes in: S is static by design
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        head.eval()
        torch.onnx.export(
            head,
            (dummy,),
            output,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    onnx_model = onnx.load(output)
    # The tracer leaves the output's K, S, S symbolic; Deepness reads K from the output shape and
    # checks that it is square, so they are written down.
    dims = onnx_model.graph.output[0].type.tensor_type.shape.dim
    dims[0].dim_param = "batch"
    for dim, value in zip(dims[1:], (model.vocabulary_size, tile_size, tile_size)):
        dim.dim_value = int(value)
    check_contract(onnx_model, output)
    meta = deepness_metadata(card, tile_size, list(model.class_names), resolution_cm, tiles_overlap)
    write_metadata(onnx_model, meta)
    onnx.save(onnx_model, output)
    onnx.checker.check_model(onnx.load(output))  # reload: what was written is valid
    return meta


@torch.no_grad()
def pytorch_probabilities(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The PyTorch fp32 reference of the exported graph on (B, C, S, S) tiles: the
    model's own ``predict_sem_seg_probs`` (its fast CPU path), normalised over K."""
    probs = model.predict_sem_seg_probs(images.float())
    return probs / probs.sum(1, keepdim=True).clamp_min(1e-12)
