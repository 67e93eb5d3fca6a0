"""Multi-scale deformable attention (Deformable DETR) with a compiled op and a PyTorch reference.

``ms_deform_attn`` samples, for every query ``q`` and head ``h``, ``P`` points on each of ``L``
feature levels with bilinear interpolation and sums them weighted by the attention weights.

Implementations (chosen by ``impl``):

* ``"pytorch"`` -- the reference: ``F.grid_sample`` (``align_corners=False``, zero padding).
  Always available, any device and dtype.
* ``"cpp"`` -- the compiled extension ``segclip_d2._C`` (CPU kernel; CUDA kernel when it was built
  with CUDA). Raises a clear error when the extension is not built.
* ``"auto"`` -- the compiled op when it is built for the tensors' device, else the reference.
  The decision is logged once per process (``logger.info``).

Conventions of the compiled op wrapper:

* Inputs are made contiguous before the op is called (the C++ op itself checks contiguity).
* float16 / bfloat16 inputs are cast to float32 for the compiled op and the result is cast back
  to the input dtype; gradients flow back through the casts. One exception: without autograd
  the CPU kernel reads bfloat16 values directly (exactly, as float32) with float32 locations and
  weights, which halves the memory the sampling reads.
* The compiled backward is first-order only (``once_differentiable``); use ``impl="pytorch"``
  for double backward.
* Setting the environment variable ``SEGCLIP_DISABLE_EXT=1`` before import hides the extension
  (``"auto"`` then uses the reference); tests may also set ``segclip_d2.layers.ms_deform_attn._C``
  to ``None``.

The CPU kernel is compiled in a baseline copy, an AVX2+FMA copy and an AVX-512 copy; the best
one the CPU supports is chosen at run time (``_C.cpu_isa()`` tells which one runs, the log line
names it too, and ``_C.cpu_isas()`` lists the copies this machine can run).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

logger = logging.getLogger(__name__)

BUILD_COMMAND = "`make setup` or `.venv/bin/pip install --no-build-isolation -e .`"

_IMPORT_ERROR: str | None = None
if os.environ.get("SEGCLIP_DISABLE_EXT", "0") not in ("", "0"):
    _C = None
    _IMPORT_ERROR = "disabled by SEGCLIP_DISABLE_EXT"
else:
    try:
        from segclip_d2 import _C  # type: ignore[attr-defined]
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

_LOGGED_DECISIONS: set[tuple[str, str]] = set()

_VALID_IMPLS = ("auto", "cpp", "pytorch")


def extension_available() -> bool:
    """Whether the compiled extension ``segclip_d2._C`` is importable (and not hidden)."""
    return _C is not None


def extension_has_cuda() -> bool:
    """Whether the compiled extension was built with its CUDA kernels."""
    return _C is not None and bool(_C.with_cuda())


def _log_once(impl: str, reason: str) -> None:
    key = (impl, reason)
    if key not in _LOGGED_DECISIONS:
        _LOGGED_DECISIONS.add(key)
        logger.info("MSDeformAttn implementation: %s (%s)", impl, reason)


def ms_deform_attn_pytorch(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Reference multi-scale deformable attention with ``F.grid_sample``.

    Args:
        value: (B, S, H, Dh) values of all levels, flattened level after level.
        spatial_shapes: (L, 2) int64 (H_l, W_l) of each level.
        sampling_locations: (B, Q, H, L, P, 2) normalised (x, y) in [0, 1]; 0 and 1 are the
            outer edges of the map (pixel centres at (i + 0.5) / W), outside points read zeros.
        attention_weights: (B, Q, H, L, P).

    Returns:
        (B, Q, H * Dh)
    """
    B, S, H, Dh = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    value_list = value.split(sizes, dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    sampled = []
    for lvl, (h_l, w_l) in enumerate(spatial_shapes.tolist()):
        # (B, H_l*W_l, H, Dh) -> (B*H, Dh, H_l, W_l)
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(B * H, Dh, int(h_l), int(w_l))
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


class _MSDeformAttnFunction(torch.autograd.Function):
    """Autograd wrapper of the compiled op (float32/float64, contiguous inputs)."""

    @staticmethod
    def forward(
        ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    ):
        out = _C.ms_deform_attn_forward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
        ctx.save_for_backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = (
            ctx.saved_tensors
        )
        grad_value, grad_loc, grad_attn = _C.ms_deform_attn_backward(
            value,
            spatial_shapes,
            level_start_index,
            sampling_locations,
            attention_weights,
            grad_output.contiguous(),
        )
        return grad_value, None, None, grad_loc, grad_attn


def _compiled_supports(device: torch.device) -> tuple[bool, str]:
    if _C is None:
        return False, f"compiled op segclip_d2._C not available ({_IMPORT_ERROR})"
    if device.type == "cpu":
        return True, f"compiled CPU kernel segclip_d2._C, {_C.cpu_isa()}"
    if device.type == "cuda":
        if extension_has_cuda():
            return True, "compiled CUDA kernel segclip_d2._C"
        return False, "segclip_d2._C was built without CUDA"
    return False, f"no compiled kernel for device type {device.type!r}"


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    impl: str = "auto",
) -> torch.Tensor:
    """Multi-scale deformable attention.

    Args:
        value: (B, S, H, Dh), S = sum_l H_l * W_l.
        spatial_shapes: (L, 2) int64 (H_l, W_l).
        level_start_index: (L,) int64 offset of each level in S.
        sampling_locations: (B, Q, H, L, P, 2) in [0, 1] as (x, y).
        attention_weights: (B, Q, H, L, P).
        impl: "auto", "cpp" or "pytorch" (see the module docstring).

    Returns:
        (B, Q, H * Dh)
    """
    if impl not in _VALID_IMPLS:
        raise ValueError(f"impl must be one of {_VALID_IMPLS}, got {impl!r}")
    if impl == "pytorch":
        _log_once("pytorch", "requested with impl='pytorch'")
        return ms_deform_attn_pytorch(value, spatial_shapes, sampling_locations, attention_weights)

    ok, reason = _compiled_supports(value.device)
    if not ok:
        if impl == "cpp":
            raise RuntimeError(
                f"ms_deform_attn(impl='cpp'): {reason}. Build it with {BUILD_COMMAND}, "
                "or use impl='pytorch' / 'auto'."
            )
        _log_once("pytorch", f"fallback reference: {reason}")
        return ms_deform_attn_pytorch(value, spatial_shapes, sampling_locations, attention_weights)

    _log_once("cpp", reason)
    out_dtype = value.dtype
    compute_dtype = out_dtype if out_dtype in (torch.float32, torch.float64) else torch.float32
    args = (
        spatial_shapes.to(device=value.device, dtype=torch.long).contiguous(),
        level_start_index.to(device=value.device, dtype=torch.long).contiguous(),
        sampling_locations.to(compute_dtype).contiguous(),
        attention_weights.to(compute_dtype).contiguous(),
    )
    if compiled_reads_bf16(value):  # no autograd: the kernel reads the bf16 values as they are
        out = _C.ms_deform_attn_forward(value.contiguous(), *args)
    else:
        out = _MSDeformAttnFunction.apply(value.to(compute_dtype).contiguous(), *args)
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


def _softmax_last_(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension. Without autograd it overwrites ``x`` (fp32 ``x``; a
    reduced-precision ``x`` is first copied to fp32) with
    exp(x - max) / sum: for the short rows here (L * P = 12) that is ~6x faster on CPU than
    ``Tensor.softmax``, whose kernel vectorises along the row."""
    if torch.is_grad_enabled():
        return x.softmax(-1)
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    x = x.sub_(x.amax(-1, keepdim=True)).exp_()
    return x.div_(x.sum(-1, keepdim=True))


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
        input_spatial_shapes: torch.Tensor,
        input_level_start_index: torch.Tensor,
        input_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            query: (B, Q, C)
            reference_points: (B, Q, L, 2) normalised (x, y) in [0, 1].
            input_flatten: (B, S, C) values of all levels, S = sum_l H_l * W_l.
            input_spatial_shapes: (L, 2) int64 (H_l, W_l).
            input_level_start_index: (L,) int64.
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
        input_spatial_shapes: torch.Tensor,
        input_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Checked value projection: (B, S, C) -> (B, S, H, Dh), zero at padded positions.

        Split from :meth:`attend` so that a caller can attend with the queries in chunks while
        projecting the values once (``segclip_d2.inference.optimize`` does this).
        """
        B, S, C = input_flatten.shape
        L = self.n_levels
        if C != self.d_model:
            raise ValueError(
                f"MSDeformAttn(d_model={self.d_model}): got input_flatten "
                f"{tuple(input_flatten.shape)}"
            )
        if tuple(input_spatial_shapes.shape) != (L, 2):
            raise ValueError(
                f"MSDeformAttn(n_levels={L}): input_spatial_shapes must be ({L}, 2), got "
                f"{tuple(input_spatial_shapes.shape)}"
            )
        total = int((input_spatial_shapes[:, 0] * input_spatial_shapes[:, 1]).sum())
        if total != S:
            raise ValueError(
                f"MSDeformAttn: sum of H_l*W_l over input_spatial_shapes "
                f"{input_spatial_shapes.tolist()} is {total}, but input_flatten has S={S}"
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
        input_spatial_shapes: torch.Tensor,
        input_level_start_index: torch.Tensor,
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
        inv = 1.0 / torch.stack([input_spatial_shapes[:, 1], input_spatial_shapes[:, 0]], -1)
        inv = inv.to(self.sampling_offsets.weight.dtype).view(1, L, 1, 2).expand(H, L, P, 2)
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
            input_spatial_shapes,
            input_level_start_index,
            locations.view(B, Q, H, L, P, 2),
            weights,
            impl=self.impl,
        )  # (B, Q, C)
        return self.output_proj(out)
