"""Multi-scale deformable attention (Deformable DETR) as a ``torch.library`` operator.

``ms_deform_attn`` samples, for every query ``q`` and head ``h``, ``P`` points on each of ``L``
feature levels with bilinear interpolation and sums them weighted by the attention weights.

The compiled kernels are the custom operator ``torch.ops.segclip_d2.ms_deform_attn``::

    segclip_d2::ms_deform_attn(Tensor value, SymInt[] spatial_shapes,
                               Tensor sampling_locations, Tensor attention_weights) -> Tensor

with ``spatial_shapes`` flattened as ``[H_0, W_0, H_1, W_1, ...]`` (integers, not a tensor: the
level sizes are part of the graph, so compilers and exporters need no data-dependent reads).
It has a CPU kernel and, when ``segclip_d2._C`` was built with CUDA, a CUDA kernel (both call the
compiled C++ code), a fake kernel (shapes and dtypes only, for ``torch.compile`` /
``torch.export``) and an autograd formula whose backward is the operator
``torch.ops.segclip_d2.ms_deform_attn_backward``. ``torch.library.opcheck`` passes on it.
For exporters that need standard operators, :func:`decompositions` maps the operator to the
PyTorch reference: ``exported.run_decompositions(decompositions())``.

Implementations of the wrapper :func:`ms_deform_attn` (chosen by ``impl``):

* ``"pytorch"`` -- the reference: ``F.grid_sample`` (``align_corners=False``, zero padding).
  Always available, any device and dtype.
* ``"cpp"`` -- the operator above. Raises a clear error when the extension is not built.
* ``"auto"`` -- the operator when it is built for the tensors' device, else the reference.
  The decision is logged once per process (``logger.info``).

Conventions of the wrapper:

* ``spatial_shapes`` may be an (L, 2) int64 tensor (as in Deformable DETR) or a sequence of
  ``(H_l, W_l)`` integers; pass the sequence under ``torch.compile`` / ``torch.export`` (a tensor
  is read with ``.tolist()``, which they cannot trace). ``level_start_index`` is implied by the
  shapes; a CPU tensor given outside compilation is checked against them.
* float16 / bfloat16 inputs are cast to float32 for the compiled op and the result is cast back
  to the input dtype; gradients flow back through the casts. One exception: without autograd
  the CPU kernel reads bfloat16 values directly (exactly, as float32) with float32 locations and
  weights, which halves the memory the sampling reads.
* The compiled backward is first-order only; use ``impl="pytorch"`` for double backward.
* Setting the environment variable ``SEGCLIP_DISABLE_EXT=1`` before import hides the extension
  (``"auto"`` then uses the reference); tests may also set ``segclip_d2.layers.ms_deform_attn._C``
  to ``None``. The operator is registered either way; without the extension its kernels raise.

The CPU kernel is compiled in a baseline copy, an AVX2+FMA copy and an AVX-512 copy; the best
one the CPU supports is chosen at run time (``_C.cpu_isa()`` tells which one runs, the log line
names it too, and ``_C.cpu_isas()`` lists the copies this machine can run).
"""

from __future__ import annotations

import importlib
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

BUILD_COMMAND = "`make setup` or `.venv/bin/pip install --no-build-isolation -e .`"

_IMPORT_ERROR: str | None = None
if os.environ.get("SEGCLIP_DISABLE_EXT", "0") not in ("", "0"):
    _C = None
    _IMPORT_ERROR = "disabled by SEGCLIP_DISABLE_EXT"
else:
    try:
        # The compiled extension, by its full name: it is not Python source, and importing it
        # through the package (``from segclip_d2 import _C``) would pull in the whole package.
        _C = importlib.import_module("segclip_d2._C")
    except ImportError as e:  # only a missing/unloadable extension, never other errors
        _C = None
        _IMPORT_ERROR = f"{type(e).__name__}: {e}"
        if any(Path(__file__).resolve().parents[1].glob("_C.*")):
            # built but not loadable (e.g. compiled against another torch): say so loudly
            logger.warning(
                "segclip_d2._C exists but failed to load (%s); rebuild it with %s",
                _IMPORT_ERROR,
                BUILD_COMMAND,
            )

# asked once: a pybind call inside a traced function would break the graph
_C_HAS_CUDA = _C is not None and bool(_C.with_cuda())

_LOGGED_DECISIONS: set[tuple[str, str]] = set()

_VALID_IMPLS = ("auto", "cpp", "pytorch")

Shapes = Sequence[Sequence[int]]


def extension_available() -> bool:
    """Whether the compiled extension ``segclip_d2._C`` is importable (and not hidden)."""
    return _C is not None


def extension_has_cuda() -> bool:
    """Whether the compiled extension was built with its CUDA kernels."""
    return _C is not None and _C_HAS_CUDA


def _log_once(impl: str, reason) -> None:
    """Logs the implementation in use once per (impl, reason); ``reason`` may be a callable
    (evaluated only when logged). Silent while torch.compile / torch.export trace."""
    if torch.compiler.is_compiling():
        return
    reason = reason() if callable(reason) else reason
    key = (impl, reason)
    if key not in _LOGGED_DECISIONS:
        _LOGGED_DECISIONS.add(key)
        logger.info("MSDeformAttn implementation: %s (%s)", impl, reason)


def _shape_pairs(spatial_shapes: torch.Tensor | Shapes) -> list[tuple[int, int]]:
    """[(H_l, W_l)] from an (L, 2) tensor or a sequence of pairs (ints or SymInts kept)."""
    if isinstance(spatial_shapes, torch.Tensor):
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
            raise ValueError(
                f"ms_deform_attn: spatial_shapes must be (L, 2), got {tuple(spatial_shapes.shape)}"
            )
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    pairs = [tuple(p) for p in spatial_shapes]
    if any(len(p) != 2 for p in pairs):
        raise ValueError(f"ms_deform_attn: spatial_shapes must be (H, W) pairs, got {pairs}")
    return pairs  # type: ignore[return-value]


def ms_deform_attn_pytorch(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor | Shapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Reference multi-scale deformable attention with ``F.grid_sample``.

    Only standard operators with static level sizes, so it is also the decomposition of the
    compiled operator for exporters (see :func:`decompositions`). Every intermediate keeps the
    dtype of ``sampling_locations`` (float32 grids for float32 input: ONNX GridSample in
    onnxruntime rejects float64 grids).

    Args:
        value: (B, S, H, Dh) values of all levels, flattened level after level.
        spatial_shapes: (L, 2) int64 tensor or L pairs (H_l, W_l) of each level.
        sampling_locations: (B, Q, H, L, P, 2) normalised (x, y) in [0, 1]; 0 and 1 are the
            outer edges of the map (pixel centres at (i + 0.5) / W), outside points read zeros.
        attention_weights: (B, Q, H, L, P).

    Returns:
        (B, Q, H * Dh)
    """
    shapes = _shape_pairs(spatial_shapes)
    B, S, H, Dh = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    value_list = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    sampled = []
    for lvl, (h_l, w_l) in enumerate(shapes):
        # (B, H_l*W_l, H, Dh) -> (B*H, Dh, H_l, W_l)
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(B * H, Dh, h_l, w_l)
        # (B, Q, H, P, 2) -> (B*H, Q, P, 2)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        # (B*H, Dh, Q, P)
        sampled.append(
            F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # (B, Q, H, L, P) -> (B*H, 1, Q, L*P)
    w = attention_weights.transpose(1, 2).reshape(B * H, 1, Q, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * w).sum(-1)  # (B*H, Dh, Q)
    return out.view(B, H * Dh, Q).transpose(1, 2).contiguous()


# ----------------------------------------------------------------------------- the operator

_SHAPE_TENSORS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _shape_tensors(flat: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, 2) spatial shapes and (L,) level starts as int64 tensors on ``device``, cached (the
    C++ op takes tensors; building them per call would cost a host-to-device copy on CUDA)."""
    key = (tuple(int(v) for v in flat), str(device))
    hit = _SHAPE_TENSORS.get(key)
    if hit is None:
        shapes = torch.tensor(key[0], dtype=torch.long).view(-1, 2)
        areas = shapes[:, 0] * shapes[:, 1]
        starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
        hit = (shapes.to(device), starts.to(device))
        if len(_SHAPE_TENSORS) > 64:
            _SHAPE_TENSORS.clear()
        _SHAPE_TENSORS[key] = hit
    return hit


def _require_extension() -> None:
    if _C is None:
        raise RuntimeError(
            f"torch.ops.segclip_d2.ms_deform_attn: the compiled op segclip_d2._C is not "
            f"available ({_IMPORT_ERROR}); build it with {BUILD_COMMAND}, or use the reference "
            "(ms_deform_attn(..., impl='pytorch'), or decompositions() on an exported program)"
        )


def _check_flat_shapes(spatial_shapes: Sequence[int], value: torch.Tensor) -> None:
    torch._check(
        len(spatial_shapes) % 2 == 0,
        lambda: (
            "segclip_d2::ms_deform_attn: spatial_shapes must be [H_0, W_0, H_1, W_1, ...], "
            f"got {list(spatial_shapes)}"
        ),
    )


def _forward_kernel(
    value: torch.Tensor,
    spatial_shapes: Sequence[int],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """The CPU / CUDA kernel of the operator: the compiled C++ op."""
    _require_extension()
    _check_flat_shapes(spatial_shapes, value)
    shapes, starts = _shape_tensors(spatial_shapes, value.device)
    return _C.ms_deform_attn_forward(
        value.contiguous(),
        shapes,
        starts,
        sampling_locations.contiguous(),
        attention_weights.contiguous(),
    )


@torch.library.custom_op(
    "segclip_d2::ms_deform_attn", mutates_args=(), device_types=("cpu", "cuda")
)
def _ms_deform_attn_op(
    value: torch.Tensor,
    spatial_shapes: Sequence[int],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """value (B, S, H, Dh), spatial_shapes [H_0, W_0, ...], sampling_locations
    (B, Q, H, L, P, 2), attention_weights (B, Q, H, L, P) -> (B, Q, H * Dh); float32 or
    float64 (bfloat16 values with float32 locations and weights on the CPU, float32 output)."""
    return _forward_kernel(value, spatial_shapes, sampling_locations, attention_weights)


def _output_dtype(value: torch.Tensor, sampling_locations: torch.Tensor) -> torch.dtype:
    return torch.float32 if value.dtype == torch.bfloat16 else value.dtype


@_ms_deform_attn_op.register_fake
def _ms_deform_attn_fake(value, spatial_shapes, sampling_locations, attention_weights):
    _check_flat_shapes(spatial_shapes, value)
    torch._check(
        value.dim() == 4 and sampling_locations.dim() == 6 and attention_weights.dim() == 5,
        lambda: (
            "segclip_d2::ms_deform_attn: expected value (B, S, H, Dh), sampling_locations "
            f"(B, Q, H, L, P, 2), attention_weights (B, Q, H, L, P); got {tuple(value.shape)}, "
            f"{tuple(sampling_locations.shape)}, {tuple(attention_weights.shape)}"
        ),
    )
    B, _, H, Dh = value.shape
    Q = sampling_locations.shape[1]
    dtype = _output_dtype(value, sampling_locations)
    return value.new_empty((B, Q, H * Dh), dtype=dtype)


@torch.library.custom_op(
    "segclip_d2::ms_deform_attn_backward", mutates_args=(), device_types=("cpu", "cuda")
)
def _ms_deform_attn_backward_op(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: Sequence[int],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (grad_value, grad_sampling_locations, grad_attention_weights); float32 / float64."""
    _require_extension()
    shapes, starts = _shape_tensors(spatial_shapes, value.device)
    grad_value, grad_loc, grad_attn = _C.ms_deform_attn_backward(
        value.contiguous(),
        shapes,
        starts,
        sampling_locations.contiguous(),
        attention_weights.contiguous(),
        grad_output.contiguous(),
    )
    return grad_value, grad_loc, grad_attn


@_ms_deform_attn_backward_op.register_fake
def _ms_deform_attn_backward_fake(
    grad_output, value, spatial_shapes, sampling_locations, attention_weights
):
    return (
        torch.empty_like(value, memory_format=torch.contiguous_format),
        torch.empty_like(sampling_locations, memory_format=torch.contiguous_format),
        torch.empty_like(attention_weights, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    value, spatial_shapes, sampling_locations, attention_weights = inputs
    ctx.spatial_shapes = list(spatial_shapes)
    ctx.save_for_backward(value, sampling_locations, attention_weights)


def _backward(ctx, grad_output):
    value, sampling_locations, attention_weights = ctx.saved_tensors
    # bf16 values (the CPU forward reads them as float32): the backward runs in float32
    value32 = value.to(grad_output.dtype)
    grad_value, grad_loc, grad_attn = torch.ops.segclip_d2.ms_deform_attn_backward(
        grad_output, value32, ctx.spatial_shapes, sampling_locations, attention_weights
    )
    return grad_value.to(value.dtype), None, grad_loc, grad_attn


torch.library.register_autograd(
    "segclip_d2::ms_deform_attn", _backward, setup_context=_setup_context
)


def _reference_decomposition(value, spatial_shapes, sampling_locations, attention_weights):
    """The operator's signature over :func:`ms_deform_attn_pytorch` (same dtypes out)."""
    pairs = [(spatial_shapes[i], spatial_shapes[i + 1]) for i in range(0, len(spatial_shapes), 2)]
    dtype = _output_dtype(value, sampling_locations)
    return ms_deform_attn_pytorch(
        value.to(dtype), pairs, sampling_locations.to(dtype), attention_weights.to(dtype)
    )


def decompositions() -> dict:
    """``{torch.ops.segclip_d2.ms_deform_attn.default: reference}`` for
    ``ExportedProgram.run_decompositions``: the result has only standard operators
    (``grid_sample`` and tensor arithmetic), e.g. for ONNX."""
    return {torch.ops.segclip_d2.ms_deform_attn.default: _reference_decomposition}


def _compiled_supports(device: torch.device) -> bool:
    if _C is None:
        return False
    return device.type == "cpu" or (device.type == "cuda" and _C_HAS_CUDA)


def _unsupported_reason(device: torch.device) -> str:
    if _C is None:
        return f"compiled op segclip_d2._C not available ({_IMPORT_ERROR})"
    if device.type == "cuda":
        return "segclip_d2._C was built without CUDA"
    return f"no compiled kernel for device type {device.type!r}"


def _supported_reason(device: torch.device) -> str:
    if device.type == "cpu":
        return f"compiled CPU kernel segclip_d2._C, {_C.cpu_isa()}"
    return "compiled CUDA kernel segclip_d2._C"


def _check_level_start_index(level_start_index, pairs: list[tuple[int, int]]) -> None:
    """Deformable DETR passes the level offsets too; a CPU tensor is checked (eager only)."""
    if (
        not isinstance(level_start_index, torch.Tensor)
        or level_start_index.device.type != "cpu"
        or torch.compiler.is_compiling()
    ):
        return
    expected, total = [], 0
    for h, w in pairs:
        expected.append(total)
        total += h * w
    got = level_start_index.tolist()
    if got != expected:
        raise ValueError(
            f"ms_deform_attn: level_start_index {got} is not the running sum of H_l*W_l of "
            f"spatial_shapes {[list(p) for p in pairs]} (expected {expected})"
        )


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor | Shapes,
    level_start_index: torch.Tensor | None,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    impl: str = "auto",
) -> torch.Tensor:
    """Multi-scale deformable attention.

    Args:
        value: (B, S, H, Dh), S = sum_l H_l * W_l.
        spatial_shapes: (L, 2) int64 tensor or L pairs (H_l, W_l); pairs under
            torch.compile / torch.export.
        level_start_index: (L,) int64 offset of each level in S, or None (implied by the shapes).
        sampling_locations: (B, Q, H, L, P, 2) in [0, 1] as (x, y).
        attention_weights: (B, Q, H, L, P).
        impl: "auto", "cpp" or "pytorch" (see the module docstring).

    Returns:
        (B, Q, H * Dh)
    """
    if impl not in _VALID_IMPLS:
        raise ValueError(f"impl must be one of {_VALID_IMPLS}, got {impl!r}")
    pairs = _shape_pairs(spatial_shapes)
    _check_level_start_index(level_start_index, pairs)
    if impl == "pytorch":
        _log_once("pytorch", "requested with impl='pytorch'")
        return ms_deform_attn_pytorch(value, pairs, sampling_locations, attention_weights)

    if not _compiled_supports(value.device):
        reason = _unsupported_reason(value.device)
        if impl == "cpp":
            raise RuntimeError(
                f"ms_deform_attn(impl='cpp'): {reason}. Build it with {BUILD_COMMAND}, "
                "or use impl='pytorch' / 'auto'."
            )
        _log_once("pytorch", f"fallback reference: {reason}")
        return ms_deform_attn_pytorch(value, pairs, sampling_locations, attention_weights)

    _log_once("cpp", lambda: _supported_reason(value.device))
    out_dtype = value.dtype
    compute_dtype = out_dtype if out_dtype in (torch.float32, torch.float64) else torch.float32
    flat = [s for pair in pairs for s in pair]
    loc = sampling_locations.to(compute_dtype)
    attn = attention_weights.to(compute_dtype)
    if not compiled_reads_bf16(value):  # else the kernel reads the bf16 values as they are
        value = value.to(compute_dtype)
    out = torch.ops.segclip_d2.ms_deform_attn(value, flat, loc, attn)
    return out.to(out_dtype)


def compiled_reads_bf16(value: torch.Tensor) -> bool:
    """Whether the compiled op takes ``value`` as bfloat16 without converting it: the CPU
    kernel's forward, when no gradient is needed."""
    return (
        value.dtype == torch.bfloat16
        and value.device.type == "cpu"
        and _C is not None
        and not (torch.is_grad_enabled() and value.requires_grad)
    )


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (Deformable DETR, Zhu et al. 2021).

    Args:
        d_model: channels C of queries and values.
        n_levels: number of feature levels L.
        n_heads: attention heads H (C must be divisible by H).
        n_points: sampling points P per head and level.
        impl: "auto", "cpp" or "pytorch", passed to :func:`ms_deform_attn`.
    """

    def __init__(
        self,
        d_model: int = 256,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        impl: str = "auto",
    ):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if impl not in _VALID_IMPLS:
            raise ValueError(f"impl must be one of {_VALID_IMPLS}, got {impl!r}")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.impl = impl

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Offsets start at zero weight; the bias spreads the heads over 8 directions with the
        # k-th point k pixels away, so the initial pattern is a ring per head.
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        dirs = torch.stack([angles.cos(), angles.sin()], dim=-1)  # (H, 2)
        dirs = dirs / dirs.abs().max(dim=-1, keepdim=True).values
        scale = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        bias = dirs.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1) * scale
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        input_spatial_shapes: torch.Tensor | Shapes,
        input_level_start_index: torch.Tensor | None,
        input_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            query: (B, Q, C)
            reference_points: (B, Q, L, 2) normalised (x, y) in [0, 1].
            input_flatten: (B, S, C) values of all levels, S = sum_l H_l * W_l.
            input_spatial_shapes: (L, 2) int64 tensor or L pairs (H_l, W_l); pairs under
                torch.compile / torch.export.
            input_level_start_index: (L,) int64, or None (implied by the shapes).
            input_padding_mask: (B, S) bool, True at padded positions (read as zeros), or None.

        Returns:
            (B, Q, C)
        """
        if query.shape[-1] != self.d_model:
            raise ValueError(
                f"MSDeformAttn(d_model={self.d_model}): got query {tuple(query.shape)} and "
                f"input_flatten {tuple(input_flatten.shape)}"
            )
        value = self.project_value(input_flatten, input_spatial_shapes, input_padding_mask)
        return self.attend(
            query, reference_points, value, input_spatial_shapes, input_level_start_index
        )

    def project_value(
        self,
        input_flatten: torch.Tensor,
        input_spatial_shapes: torch.Tensor | Shapes,
        input_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Checked value projection: (B, S, C) -> (B, S, H, Dh), zero at padded positions.

        Split from :meth:`attend` so that a caller can attend with the queries in chunks while
        projecting the values once (``segclip_d2.predict.optimize`` does this).
        """
        B, S, C = input_flatten.shape
        L = self.n_levels
        if C != self.d_model:
            raise ValueError(
                f"MSDeformAttn(d_model={self.d_model}): got input_flatten "
                f"{tuple(input_flatten.shape)}"
            )
        shapes = _shape_pairs(input_spatial_shapes)
        if len(shapes) != L:
            raise ValueError(
                f"MSDeformAttn(n_levels={L}): input_spatial_shapes must be ({L}, 2), got "
                f"{[list(p) for p in shapes]}"
            )
        total = sum(h * w for h, w in shapes)
        if total != S:
            raise ValueError(
                f"MSDeformAttn: sum of H_l*W_l over input_spatial_shapes "
                f"{[list(p) for p in shapes]} is {total}, but input_flatten has S={S}"
            )
        value = self.value_proj(input_flatten)  # (B, S, C)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        return value.view(B, S, self.n_heads, C // self.n_heads)

    def attend(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        input_spatial_shapes: torch.Tensor | Shapes,
        input_level_start_index: torch.Tensor | None,
    ) -> torch.Tensor:
        """(B, Q, C) queries over values from :meth:`project_value` -> (B, Q, C)."""
        B, Q, C = query.shape
        H, L, P = self.n_heads, self.n_levels, self.n_points
        if tuple(reference_points.shape) != (B, Q, L, 2):
            raise ValueError(
                f"MSDeformAttn: reference_points must be {(B, Q, L, 2)}, got "
                f"{tuple(reference_points.shape)}"
            )
        weights = self.attention_weights(query).view(B, Q, H, L * P)
        weights = weights.softmax(-1).view(B, Q, H, L, P)
        # Offsets are in pixels of each level; dividing the rows of the projection by (W_l, H_l)
        # gives normalised offsets in one pass (the division by the level size costs a full pass
        # over a (B, Q, H, L, P, 2) tensor otherwise).
        shapes = _shape_pairs(input_spatial_shapes)
        inv = torch.tensor(
            [(1.0 / w, 1.0 / h) for h, w in shapes],
            dtype=self.sampling_offsets.weight.dtype,
            device=query.device,
        )
        inv = inv.view(1, L, 1, 2).expand(H, L, P, 2)
        inv = inv.reshape(-1)
        offsets = F.linear(
            query, self.sampling_offsets.weight * inv[:, None], self.sampling_offsets.bias * inv
        ).view(B, Q, H, L * P * 2)
        # the reference point of each level repeated over its P points: (B, Q, 1, L * P * 2),
        # so the broadcast add below runs over H only (with a last dim of 2 it is ~4x slower)
        ref = reference_points[:, :, None, :, None, :].expand(B, Q, 1, L, P, 2)
        ref = ref.reshape(B, Q, 1, L * P * 2)
        if offsets.dtype == ref.dtype:
            locations = offsets.add_(ref)
        else:  # autocast: keep the positions in the reference points' (parameter) precision
            locations = ref + offsets
        out = ms_deform_attn(
            value,
            shapes,
            input_level_start_index,
            locations.view(B, Q, H, L, P, 2),
            weights,
            impl=self.impl,
        )  # (B, Q, C)
        return self.output_proj(out)
