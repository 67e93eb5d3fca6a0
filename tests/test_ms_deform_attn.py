"""Multi-scale deformable attention: compiled op vs reference, gradients, dispatch, bad input."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from functorch.compile import make_boxed_func
from torch import nn
from torch._dynamo.backends.common import aot_autograd

import segclip_d2.layers.ms_deform_attn as msda
from segclip_d2.layers import MSDeformAttn, ms_deform_attn_pytorch
from segclip_d2.layers.ms_deform_attn import ms_deform_attn

REPO_ROOT = Path(__file__).resolve().parents[1]
BUILD_HINT = "segclip_d2._C is not built (run `.venv/bin/pip install --no-build-isolation -e .`)"
needs_ext = pytest.mark.skipif(not msda.extension_available(), reason=BUILD_HINT)
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and msda.extension_has_cuda()),
    reason="needs a GPU and segclip_d2._C built with CUDA",
)


def make_inputs(shapes, batch, heads, head_dim, queries, points, dtype, seed, outside=0.3):
    """Random inputs; `outside` widens the location range beyond [0, 1] on each side."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(shapes, dtype=torch.long)
    areas = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S, L = int(areas.sum()), len(shapes)
    value = torch.randn(batch, S, heads, head_dim, generator=g, dtype=dtype)
    loc = torch.rand(batch, queries, heads, L, points, 2, generator=g, dtype=dtype)
    loc = loc * (1 + 2 * outside) - outside
    attn = torch.rand(batch, queries, heads, L, points, generator=g, dtype=dtype)
    return value, shapes, starts, loc, attn


def naive_ms_deform_attn(value, shapes, starts, loc, attn):
    """Loop version of the definition: pixel centres at (i + 0.5) / W, zeros outside the map."""
    B, _, H, Dh = value.shape
    _, Q, _, L, P, _ = loc.shape
    out = torch.zeros(B, Q, H, Dh, dtype=value.dtype)
    for b in range(B):
        for q in range(Q):
            for h in range(H):
                for lvl in range(L):
                    hl, wl = shapes[lvl].tolist()
                    for p in range(P):
                        x = float(loc[b, q, h, lvl, p, 0]) * wl - 0.5
                        y = float(loc[b, q, h, lvl, p, 1]) * hl - 0.5
                        x0, y0 = (
                            int(torch.floor(torch.tensor(x))),
                            int(torch.floor(torch.tensor(y))),
                        )
                        for yi in (y0, y0 + 1):
                            for xi in (x0, x0 + 1):
                                if 0 <= xi < wl and 0 <= yi < hl:
                                    w = (1 - abs(x - xi)) * (1 - abs(y - yi))
                                    pos = int(starts[lvl]) + yi * wl + xi
                                    out[b, q, h] += attn[b, q, h, lvl, p] * w * value[b, pos, h]
    return out.view(B, Q, H * Dh)


def test_reference_matches_definition():
    value, shapes, starts, loc, attn = make_inputs(
        [[5, 7], [3, 2]], 2, 2, 3, 5, 3, torch.float64, seed=0
    )
    expected = naive_ms_deform_attn(value, shapes, starts, loc, attn)
    got = ms_deform_attn_pytorch(value, shapes, loc, attn)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_extension_built_when_required():
    """CI sets SEGCLIP_REQUIRE_EXT=1: there a missing extension is a failure, not a skip."""
    if os.environ.get("SEGCLIP_REQUIRE_EXT", "0") != "1":
        pytest.skip("SEGCLIP_REQUIRE_EXT is not set")
    assert msda.extension_available(), f"{BUILD_HINT}: {msda._IMPORT_ERROR}"


@needs_ext
def test_gradcheck_cpu_kernel_float64():
    g = torch.Generator().manual_seed(1)
    shapes = torch.tensor([[3, 4], [2, 3]])
    starts = torch.tensor([0, 12])
    B, Q, H, Dh, L, P = 2, 3, 2, 3, 2, 2
    value = torch.randn(B, 18, H, Dh, dtype=torch.float64, generator=g, requires_grad=True)
    # pixel coordinates with fractional parts away from the kinks at integers, partly outside
    wh = torch.stack([shapes[:, 1], shapes[:, 0]], -1).double()  # (L, 2)
    cells = torch.randint(-2, 5, (B, Q, H, L, P, 2), generator=g).double()
    frac = 0.15 + 0.7 * torch.rand(B, Q, H, L, P, 2, dtype=torch.float64, generator=g)
    loc = ((cells + frac + 0.5) / wh[None, None, None, :, None, :]).requires_grad_()
    attn = torch.rand(B, Q, H, L, P, dtype=torch.float64, generator=g, requires_grad=True)

    def fn(v, sl, aw):
        return ms_deform_attn(v, shapes, starts, sl, aw, impl="cpp")

    assert torch.autograd.gradcheck(fn, (value, loc, attn), eps=1e-6, atol=1e-7, rtol=1e-5)


CASES = [
    # (level shapes (H_l, W_l), batch, heads, head_dim, queries, points)
    ([[6, 9]], 1, 1, 32, 7, 1),
    ([[8, 5], [4, 3]], 2, 3, 5, 11, 4),
    ([[10, 13], [5, 7], [3, 4]], 3, 2, 32, 9, 3),
    ([[16, 12], [8, 6], [4, 3], [1, 2]], 2, 4, 16, 13, 2),
    ([[7, 3], [1, 1], [2, 9], [5, 5]], 1, 8, 64, 5, 4),
]


@pytest.fixture(params=["baseline", "avx2+fma", "avx512"])
def cpu_copy(request):
    """Runs a test with each instruction-set copy of the CPU kernel this machine can run."""
    if not msda.extension_available():
        pytest.skip(BUILD_HINT)
    if request.param not in msda._C.cpu_isas():
        pytest.skip(f"this CPU/build cannot run the {request.param} kernel copy")
    msda._C._force_cpu_isa(request.param)
    assert msda._C.cpu_isa() == request.param
    yield request.param
    msda._C._force_cpu_isa("")


@needs_ext
def test_best_cpu_copy_is_chosen_and_unknown_copy_rejected():
    available = msda._C.cpu_isas()
    assert available[0] == "baseline"
    assert msda._C.cpu_isa() == available[-1]  # automatic choice: the widest copy
    with pytest.raises(RuntimeError, match="'sse9' is not available"):
        msda._C._force_cpu_isa("sse9")
    assert msda._C.cpu_isa() == available[-1]


@needs_ext
@pytest.mark.parametrize("case", range(len(CASES)))
def test_cpu_forward_reads_bf16_values_exactly(case, cpu_copy):
    """bf16 values with fp32 locations and weights: the same result as the fp32 kernel on the
    values converted to fp32 (the conversion is exact), for every head size path."""
    shapes, batch, heads, head_dim, queries, points = CASES[case]
    value, shapes, starts, loc, attn = make_inputs(
        shapes, batch, heads, head_dim, queries, points, torch.float32, seed=10 + case
    )
    low = value.to(torch.bfloat16)
    out = msda._C.ms_deform_attn_forward(low, shapes, starts, loc, attn)
    assert out.dtype == torch.float32
    expected = msda._C.ms_deform_attn_forward(low.float(), shapes, starts, loc, attn)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    ref = ms_deform_attn_pytorch(low.float(), shapes, loc, attn)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@needs_ext
def test_bf16_values_go_to_the_kernel_only_without_autograd():
    value, shapes, starts, loc, attn = make_inputs(
        [[6, 5], [3, 3]], 1, 2, 8, 4, 2, torch.float32, 7
    )
    low = value.to(torch.bfloat16)
    with torch.no_grad():
        assert msda.compiled_reads_bf16(low)
        out = ms_deform_attn(low, shapes, starts, loc, attn, impl="cpp")
    assert out.dtype == torch.bfloat16
    ref = ms_deform_attn_pytorch(low.float(), shapes, loc, attn)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
    # with autograd the values go through the fp32 autograd function, and gradients flow
    low.requires_grad_()
    assert not msda.compiled_reads_bf16(low)
    out = ms_deform_attn(low, shapes, starts, loc, attn, impl="cpp")
    (grad,) = torch.autograd.grad(out.float().sum(), low)
    assert grad.dtype == torch.bfloat16 and grad.abs().sum() > 0


@needs_ext
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_kernel_matches_reference(case, dtype, cpu_copy):
    shapes, batch, heads, head_dim, queries, points = CASES[case]
    value, shapes, starts, loc, attn = make_inputs(
        shapes, batch, heads, head_dim, queries, points, dtype, seed=case
    )
    inputs = [t.requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn(value, shapes, starts, loc, attn, impl="cpp")
    ref = ms_deform_attn_pytorch(value, shapes, loc, attn)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    grad_out = torch.randn_like(ref)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref_grads = torch.autograd.grad(ref, inputs, grad_out)
    gtol = 1e-4 if dtype == torch.float32 else 1e-10
    for name, g, rg in zip(("value", "sampling_locations", "attention_weights"), grads, ref_grads):
        scale = rg.abs().max().clamp_min(1e-12)
        err = ((g - rg).abs().max() / scale).item()
        assert err < gtol, f"grad of {name}: relative error {err:.2e}"


@needs_ext
def test_far_outside_points_contribute_nothing():
    value, shapes, starts, loc, attn = make_inputs(
        [[4, 6], [2, 3]], 1, 2, 4, 6, 2, torch.float32, 3
    )
    loc[0, :3] = 1e6  # far outside: must neither crash nor contribute
    loc[0, 3:, :, :, :, 0] = -1e6
    for t in (value, loc, attn):
        t.requires_grad_()
    out = ms_deform_attn(value, shapes, starts, loc, attn, impl="cpp")
    assert torch.equal(out, torch.zeros_like(out))
    grads = torch.autograd.grad(out, (value, loc, attn), torch.ones_like(out))
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


@needs_ext
def test_half_precision_is_computed_in_float32():
    value, shapes, starts, loc, attn = make_inputs(
        [[6, 5], [3, 3]], 1, 2, 8, 4, 2, torch.float32, 4
    )
    out = ms_deform_attn(value.half(), shapes, starts, loc.half(), attn.half(), impl="cpp")
    assert out.dtype == torch.float16
    ref = ms_deform_attn_pytorch(
        value.half().float(), shapes, loc.half().float(), attn.half().float()
    )
    torch.testing.assert_close(out.float(), ref, rtol=2e-3, atol=2e-3)


@needs_ext
def test_noncontiguous_inputs_are_handled_by_wrapper():
    value, shapes, starts, loc, attn = make_inputs([[5, 4]], 2, 2, 6, 5, 2, torch.float32, 5)
    value_t = value.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    assert not value_t.is_contiguous()
    out = ms_deform_attn(value_t, shapes, starts, loc, attn, impl="cpp")
    torch.testing.assert_close(out, ms_deform_attn_pytorch(value, shapes, loc, attn))


# ----------------------------------------------------------------------------- bad input


def _c_args(**overrides):
    value, shapes, starts, loc, attn = make_inputs(
        [[4, 5], [2, 3]], 2, 2, 4, 3, 2, torch.float32, 6
    )
    args = {"value": value, "shapes": shapes, "starts": starts, "loc": loc, "attn": attn}
    args.update(overrides)
    return args


def _call_c(args):
    return msda._C.ms_deform_attn_forward(
        args["value"], args["shapes"], args["starts"], args["loc"], args["attn"]
    )


@needs_ext
@pytest.mark.parametrize(
    "name,make_bad,message",
    [
        ("float16 value", lambda a: {"value": a["value"].half()}, "float32 or float64"),
        (
            "bf16 value, bf16 locations",
            lambda a: {"value": a["value"].bfloat16(), "loc": a["loc"].bfloat16()},
            "float32 locations and weights with bfloat16 values",
        ),
        ("int value", lambda a: {"value": a["value"].long()}, "float32 or float64"),
        ("mixed dtypes", lambda a: {"loc": a["loc"].double()}, "must have one dtype"),
        ("int32 shapes", lambda a: {"shapes": a["shapes"].int()}, "int64"),
        (
            "non-contiguous value",
            lambda a: {"value": a["value"].transpose(0, 1).contiguous().transpose(0, 1)},
            "value must be contiguous",
        ),
        (
            "S mismatch",
            lambda a: {"value": a["value"][:, :-1].contiguous()},
            r"is 26 but value has S=25",
        ),
        ("loc rank", lambda a: {"loc": a["loc"][..., 0].contiguous()}, r"\(B, Q, H, L, P, 2\)"),
        ("value rank", lambda a: {"value": a["value"].flatten(2)}, r"\(B, S, H, Dh\)"),
        ("attn shape", lambda a: {"attn": a["attn"][..., :1].contiguous()}, "attention_weights"),
        ("level count", lambda a: {"shapes": a["shapes"][:1].contiguous()}, "does not match value"),
        ("starts", lambda a: {"starts": torch.tensor([0, 19])}, "not the running sum"),
        (
            "shapes rank",
            lambda a: {"shapes": a["shapes"].flatten()},
            r"spatial_shapes must be \(L, 2\)",
        ),
        ("zero level", lambda a: {"shapes": torch.tensor([[0, 5], [2, 3]])}, "must be positive"),
    ],
)
def test_bad_input_raises_clear_error(name, make_bad, message):
    args = _c_args()
    args.update(make_bad(args))
    with pytest.raises(RuntimeError, match=message):
        _call_c(args)


@needs_ext
def test_bad_grad_output_raises():
    a = _c_args()
    with pytest.raises(RuntimeError, match="grad_output must be"):
        msda._C.ms_deform_attn_backward(
            a["value"], a["shapes"], a["starts"], a["loc"], a["attn"], torch.zeros(2, 3, 7)
        )


@needs_ext
def test_backward_rejects_bf16_values():
    a = _c_args()
    with pytest.raises(RuntimeError, match="bfloat16 in the CPU forward"):
        msda._C.ms_deform_attn_backward(
            a["value"].bfloat16(),
            a["shapes"],
            a["starts"],
            a["loc"],
            a["attn"],
            torch.zeros(2, 3, 8),
        )


def test_unknown_impl_rejected():
    a = _c_args()
    with pytest.raises(ValueError, match="impl must be one of"):
        ms_deform_attn(a["value"], a["shapes"], a["starts"], a["loc"], a["attn"], impl="cuda")
    with pytest.raises(ValueError, match="impl must be one of"):
        MSDeformAttn(32, 2, 4, 2, impl="fast")


# ----------------------------------------------------------------------------- dispatch


def test_cpp_impl_without_extension_names_build_command(monkeypatch):
    monkeypatch.setattr(msda, "_C", None)
    a = _c_args()
    with pytest.raises(RuntimeError, match=r"pip install --no-build-isolation -e \."):
        ms_deform_attn(a["value"], a["shapes"], a["starts"], a["loc"], a["attn"], impl="cpp")


def test_dispatch_logged_once_per_decision(monkeypatch, caplog):
    monkeypatch.setattr(msda, "_LOGGED_DECISIONS", set())
    a = _c_args()
    args = (a["value"], a["shapes"], a["starts"], a["loc"], a["attn"])
    with caplog.at_level(logging.INFO, logger=msda.__name__):
        ms_deform_attn(*args, impl="pytorch")
        ms_deform_attn(*args, impl="pytorch")
        ms_deform_attn(*args, impl="auto")
        ms_deform_attn(*args, impl="auto")
    lines = [r.getMessage() for r in caplog.records if r.name == msda.__name__]
    expected_auto = "cpp" if msda.extension_available() else "pytorch"
    assert len(lines) == 2, lines
    assert lines[0].startswith("MSDeformAttn implementation: pytorch (requested")
    assert lines[1].startswith(f"MSDeformAttn implementation: {expected_auto}")


def _module_inputs(batch=2, d_model=32, queries=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor([[8, 6], [4, 3]])
    starts = torch.tensor([0, 48])
    S = 60
    query = torch.randn(batch, queries, d_model, generator=g)
    ref = torch.rand(batch, queries, 2, 2, generator=g)
    feats = torch.randn(batch, S, d_model, generator=g)
    return query, ref, feats, shapes, starts


def test_module_auto_falls_back_without_extension(monkeypatch):
    """With the extension hidden, impl="auto" runs the reference and gives the same result."""
    torch.manual_seed(0)
    module = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2)
    with torch.no_grad():  # non-trivial offsets and weights
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    query, ref, feats, shapes, starts = _module_inputs()
    out_default = module(query, ref, feats, shapes, starts)
    monkeypatch.setattr(msda, "_C", None)
    out_hidden = module(query, ref, feats, shapes, starts)
    assert out_hidden.shape == (2, 6, 32)
    torch.testing.assert_close(out_hidden, out_default, rtol=1e-5, atol=1e-5)
    out_hidden.sum().backward()
    assert module.sampling_offsets.weight.grad is not None


def test_package_imports_and_runs_with_extension_disabled():
    code = (
        "import torch, segclip_d2\n"
        "import segclip_d2.layers.ms_deform_attn as m\n"
        "assert not m.extension_available(), 'extension should be hidden'\n"
        "mod = m.MSDeformAttn(d_model=16, n_levels=1, n_heads=2, n_points=2)\n"
        "x = torch.randn(1, 12, 16)\n"
        "out = mod(x, torch.rand(1, 12, 1, 2), x, torch.tensor([[3, 4]]), torch.tensor([0]))\n"
        "out.sum().backward()\n"
        "assert out.shape == (1, 12, 16)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, SEGCLIP_DISABLE_EXT="1")
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")


@needs_ext
def test_module_cpp_matches_pytorch_and_respects_padding_mask():
    torch.manual_seed(1)
    mod_cpp = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3, impl="cpp")
    with torch.no_grad():
        for p in mod_cpp.parameters():
            p.add_(0.1 * torch.randn_like(p))
    mod_ref = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3, impl="pytorch")
    mod_ref.load_state_dict(mod_cpp.state_dict())
    query, ref, feats, shapes, starts = _module_inputs(seed=2)
    mask = torch.zeros(2, 60, dtype=torch.bool)
    mask[:, 40:48] = True  # last row of level 0 is padding
    out = mod_cpp(query, ref, feats, shapes, starts, mask)
    torch.testing.assert_close(out, mod_ref(query, ref, feats, shapes, starts, mask))
    out.square().sum().backward()
    mod_ref(query, ref, feats, shapes, starts, mask).square().sum().backward()
    for (name, p), q in zip(mod_cpp.named_parameters(), mod_ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    feats2 = feats.clone()
    feats2[:, 40:48] = 100.0  # padded positions must not matter
    torch.testing.assert_close(mod_cpp(query, ref, feats2, shapes, starts, mask), out)


def test_module_rejects_mismatched_shapes():
    module = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2)
    query, ref, feats, shapes, starts = _module_inputs()
    with pytest.raises(ValueError, match="S=59"):
        module(query, ref, feats[:, :59], shapes, starts)
    with pytest.raises(ValueError, match="reference_points"):
        module(query, ref[:, :, :1], feats, shapes, starts)


# ----------------------------------------------------------------------------- GPU


@needs_cuda
@pytest.mark.parametrize("head_dim", [32, 8, 5])  # warp-shuffle (Dh | 32) and atomic paths
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_kernel_matches_reference_and_cpu(head_dim, dtype):
    value, shapes, starts, loc, attn = make_inputs(
        [[9, 7], [5, 4], [2, 3]], 2, 3, head_dim, 37, 4, dtype, seed=head_dim
    )
    cpu = [t.clone().requires_grad_() for t in (value, loc, attn)]
    gpu = [t.cuda().requires_grad_() for t in (value, loc, attn)]
    out_cpu = ms_deform_attn(cpu[0], shapes, starts, cpu[1], cpu[2], impl="pytorch")
    out_gpu = ms_deform_attn(gpu[0], shapes.cuda(), starts.cuda(), gpu[1], gpu[2], impl="cpp")
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=tol, atol=tol)
    grad_out = torch.randn_like(out_cpu)
    g_cpu = torch.autograd.grad(out_cpu, cpu, grad_out)
    g_gpu = torch.autograd.grad(out_gpu, gpu, grad_out.cuda())
    for a, b in zip(g_gpu, g_cpu):
        err = ((a.cpu() - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
        assert err < (1e-4 if dtype == torch.float32 else 1e-9)


@pytest.mark.parametrize("impl", ["pytorch", "auto"])
def test_module_inference_path_equals_autograd_path(impl):
    """The module computes the same with and without autograd (the compiled kernel reads bf16
    values directly only without autograd; here fp32), padding mask included."""
    torch.manual_seed(3)
    module = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3, impl=impl)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    query, ref, feats, shapes, starts = _module_inputs(seed=4)
    mask = torch.zeros(2, 60, dtype=torch.bool)
    mask[1, 48:] = True
    with torch.enable_grad():
        expected = module(query, ref, feats, shapes, starts, mask)
    with torch.no_grad():
        got = module(query, ref, feats, shapes, starts, mask)
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["pytorch", "auto"])
def test_reduced_precision_values_are_projected_in_the_autocast_dtype(impl):
    """Under bf16 autocast project_value returns the projection as computed (bf16); the op
    wrapper reads it as the kernel needs it (converting once per call is an execution
    strategy of segclip_d2.predict.optimize's chunked encoder layers). The result matches
    fp32 closely."""
    torch.manual_seed(5)
    module = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3, impl=impl).eval()
    query, ref, feats, shapes, starts = _module_inputs(seed=6)
    with torch.no_grad():
        expected = module(query, ref, feats, shapes, starts)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = module.project_value(feats, shapes)
            got = module.attend(query, ref, value, shapes, starts)
    assert value.dtype == torch.bfloat16
    assert value.shape == (2, 60, 4, 8)
    torch.testing.assert_close(got.float(), expected, rtol=0.05, atol=0.05)


# ----------------------------------------------------------------------------- torch.library


def _op_inputs(dtype, requires_grad=True, seed=11):
    value, shapes, _, loc, attn = make_inputs([[4, 5], [2, 3]], 2, 2, 4, 3, 2, dtype, seed)
    flat = shapes.flatten().tolist()
    return [t.requires_grad_(requires_grad) for t in (value, loc, attn)], flat


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_passes_for_the_cpu_operator(dtype):
    """Schema, fake kernel, autograd registration and AOT dispatch (torch.compile's path), with
    gradients; the backward operator is checked on its own too."""
    (value, loc, attn), flat = _op_inputs(dtype)
    op = torch.ops.segclip_d2.ms_deform_attn.default
    torch.library.opcheck(op, (value, flat, loc, attn))
    grad = torch.randn(2, 3, 8, dtype=dtype)
    args = (grad, value.detach(), flat, loc.detach(), attn.detach())
    torch.library.opcheck(torch.ops.segclip_d2.ms_deform_attn_backward.default, args)


@needs_ext
def test_operator_fake_kernel_gives_the_kernels_dtype_and_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    (value, loc, attn), flat = _op_inputs(torch.float32, requires_grad=False)
    op = torch.ops.segclip_d2.ms_deform_attn
    for v in (value, value.bfloat16()):  # bf16 values: fp32 output, as the CPU kernel gives
        real = op(v, flat, loc, attn)
        with FakeTensorMode() as mode:
            fake = op(mode.from_tensor(v), flat, mode.from_tensor(loc), mode.from_tensor(attn))
        assert (fake.shape, fake.dtype) == (real.shape, real.dtype) == ((2, 3, 8), torch.float32)


@needs_ext
def test_operator_backward_takes_bf16_values_in_float32():
    """Gradients through the operator with bf16 values (the wrapper converts them, but a
    direct caller may not): the backward runs in fp32 and returns a bf16 value gradient."""
    (value, loc, attn), flat = _op_inputs(torch.float32)
    low = value.detach().bfloat16().requires_grad_()
    out = torch.ops.segclip_d2.ms_deform_attn(low, flat, loc, attn)
    (grad,) = torch.autograd.grad(out.sum(), low)
    ref = ms_deform_attn_pytorch(low.float(), [(4, 5), (2, 3)], loc, attn)
    (ref_grad,) = torch.autograd.grad(ref.sum(), low)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad, ref_grad)


def _tiny_module(impl, seed=0):
    torch.manual_seed(seed)
    module = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2, impl=impl)
    with torch.no_grad():  # non-trivial offsets and weights
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module


def _segclip_calls(graph) -> int:
    return sum("segclip_d2.ms_deform_attn" in str(n.target) for n in graph.nodes)


@needs_ext
def test_compile_fullgraph_keeps_the_operator_and_matches_eager():
    """torch.compile(fullgraph=True) fails on any graph break; the compiled graph calls the
    operator (not the reference), forward and backward equal eager."""
    module = _tiny_module("cpp")
    query, ref, feats, shapes, _ = _module_inputs()
    pairs = [tuple(p) for p in shapes.tolist()]
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        keep = aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g))
        return keep(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    out = compiled(query, ref, feats, pairs, None)
    expected = module(query, ref, feats, pairs, None)
    torch.testing.assert_close(out, expected)
    assert len(graphs) == 1 and _segclip_calls(graphs[0].graph) == 1
    grads = torch.autograd.grad(out.square().sum(), list(module.parameters()))
    ref_grads = torch.autograd.grad(expected.square().sum(), list(module.parameters()))
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg)


def _plain_model(**segclip):
    """The tiny SegCLIP model of test_model_segclip.py with the cpp op, in eval mode: as built,
    with no inference transform (segclip_d2.predict.optimize) applied."""
    from test_model_segclip import build

    from segclip_d2.predict.optimize import optimized_transforms

    model = build(MSDA_IMPL="cpp", **segclip)
    assert optimized_transforms(model) is None
    return model.eval()


class _SemSegProbs(nn.Module):
    """The model's eval forward on a batch of images, as an exportable module."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model.predict_sem_seg_probs(images)


@needs_ext
def test_pixel_decoder_traces_without_graph_break():
    """torch.compile sees the eval pixel decoder as one graph with the operator in it."""
    model = _plain_model()
    images = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        features = model.backbone(model._normalize(images))
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model.pixel_decoder)(features)
    assert explained.graph_break_count == 0, explained.break_reasons
    enc_layers = len(model.pixel_decoder.transformer.layers)
    assert sum(_segclip_calls(g.graph) for g in explained.graphs) == enc_layers


@needs_ext
@pytest.mark.slow
def test_export_of_the_eval_model_and_its_decomposition():
    """The whole eval forward (backbone, pixel decoder, text-query decoder, post-processing)
    exports with the operator in the graph, and decomposes to standard float32 ops."""
    wrapper = _SemSegProbs(_plain_model()).eval()
    images = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        expected = wrapper(images)
        exported = torch.export.export(wrapper, (images,))
        enc_layers = len(wrapper.model.pixel_decoder.transformer.layers)
        assert _segclip_calls(exported.graph) == enc_layers
        torch.testing.assert_close(exported.module()(images), expected)
        decomposed = exported.run_decompositions(msda.decompositions())
        assert _segclip_calls(decomposed.graph) == 0
        assert _float_dtypes(decomposed.graph) == {torch.float32}
        torch.testing.assert_close(decomposed.module()(images), expected, rtol=1e-4, atol=1e-5)


def _float_dtypes(graph) -> set:
    vals = (n.meta.get("val") for n in graph.nodes)
    return {v.dtype for v in vals if isinstance(v, torch.Tensor) and v.dtype.is_floating_point}


@needs_ext
def test_export_keeps_the_operator_and_decompositions_remove_it():
    """torch.export puts the operator in the graph; run_decompositions(decompositions()) swaps in
    the grid_sample reference (standard ops only, float32 throughout) with the same result."""
    module = _tiny_module("cpp").eval()
    query, ref, feats, shapes, _ = _module_inputs()
    pairs = [tuple(p) for p in shapes.tolist()]
    mask = torch.zeros(2, 60, dtype=torch.bool)
    mask[1, 48:] = True
    args = (query, ref, feats, pairs, None, mask)
    with torch.no_grad():
        expected = module(*args)
        exported = torch.export.export(module, args)
        assert _segclip_calls(exported.graph) == 1
        torch.testing.assert_close(exported.module()(*args), expected)
        decomposed = exported.run_decompositions(msda.decompositions())
        assert _segclip_calls(decomposed.graph) == 0
        targets = {str(n.target) for n in decomposed.graph.nodes}
        assert any("grid_sampler" in t for t in targets), sorted(targets)
        assert _float_dtypes(decomposed.graph) == {torch.float32}
        torch.testing.assert_close(decomposed.module()(*args), expected, rtol=1e-5, atol=1e-6)


@needs_ext
def test_eager_inference_goes_through_the_operator():
    """Without autograd too, the wrapper calls the registered operator (no dispatcher bypass):
    a dispatch mode (FLOP counters, fake tensors) sees it, and the result is the kernel's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    (value, loc, attn), flat = _op_inputs(torch.float32, requires_grad=False)
    pairs = [(4, 5), (2, 3)]
    with torch.no_grad(), Recorder() as recorder:
        got = ms_deform_attn(value, pairs, None, loc, attn, impl="cpp")
    assert "segclip_d2.ms_deform_attn.default" in recorder.ops
    # the profiler observes the dispatcher without changing what the wrapper decides
    with (
        torch.no_grad(),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof,
    ):
        again = ms_deform_attn(value, pairs, None, loc, attn, impl="cpp")
    assert "segclip_d2::ms_deform_attn" in {e.name for e in prof.events()}
    kernel = msda._forward_kernel(value, flat, loc, attn)
    torch.testing.assert_close(got, kernel, rtol=0, atol=0)
    torch.testing.assert_close(again, kernel, rtol=0, atol=0)
