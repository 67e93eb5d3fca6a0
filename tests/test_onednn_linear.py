"""oneDNN float32 linear at CPU inference: same results as F.linear, used only where it may be."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segclip_d2.predict.onednn_linear as odl
from segclip_d2.predict.onednn_linear import linear

needs_onednn = pytest.mark.skipif(
    not odl.onednn_linear_supported(), reason="this torch build has no oneDNN linear op"
)


@pytest.fixture
def count_onednn_calls(monkeypatch):
    """Counts the products that reach oneDNN's op."""
    calls = []
    real = torch.ops.mkldnn._linear_pointwise

    class Spy:
        def __getattr__(self, name):
            return getattr(torch.ops.mkldnn, name)

        def _linear_pointwise(self, *args):
            calls.append(args[0].shape)
            return real(*args)

    class Ops:
        mkldnn = Spy()

    monkeypatch.setattr(odl.torch, "ops", Ops())
    yield calls


@needs_onednn
@pytest.mark.parametrize(
    "shape,contiguous,bias",
    [
        ((7, 5), True, True),
        ((2, 3, 5), True, False),
        ((2, 3, 4, 5), True, True),
        ((3, 8, 5), False, True),
    ],
)
def test_linear_equals_f_linear(shape, contiguous, bias, count_onednn_calls):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    if not contiguous:
        x = x[:, ::2]
    w = torch.randn(6, 5, generator=g)
    b = torch.randn(6, generator=g) if bias else None
    with torch.no_grad():
        got = linear(x, w, b)
    assert count_onednn_calls, "no-grad fp32 CPU product did not take the oneDNN route"
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_autograd_autocast_and_other_dtypes_keep_f_linear(count_onednn_calls):
    x, w, b = torch.randn(4, 5), torch.randn(3, 5, requires_grad=True), torch.randn(3)
    out = linear(x, w, b)  # autograd on: F.linear, gradients flow
    out.sum().backward()
    assert w.grad is not None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(x, w, b).dtype == torch.bfloat16  # autocast's bf16 product
    with torch.no_grad():
        assert linear(x.double(), w.double(), b.double()).dtype == torch.float64
    assert count_onednn_calls == []


@needs_onednn
def test_environment_switch_turns_the_route_off(monkeypatch, count_onednn_calls):
    monkeypatch.setattr(odl, "_ENABLED", False)
    with torch.no_grad():
        linear(torch.randn(4, 5), torch.randn(3, 5))
    assert count_onednn_calls == []


@needs_onednn
def test_cpu_kernel_mode_routes_module_and_attention_linears_and_keeps_state(count_onednn_calls):
    """optimize_for_inference's CPU kernel mode sends every float32 F.linear of a module's
    forward without autograd to oneDNN (nn.Linear layers and the decoder's attention
    projections alike), with F.linear's results; with autograd nothing changes."""
    from segclip_d2.modeling.transformer_decoder.attention_layers import SelfAttentionLayer
    from segclip_d2.predict.optimize import install_cpu_kernels

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), SelfAttentionLayer(8, 2), nn.Linear(8, 3))
    keys = list(model.state_dict())
    x = torch.randn(2, 6, 5)
    with torch.no_grad():
        expected = model(x)
    install_cpu_kernels(model)
    with torch.no_grad():
        got = model(x)
    # 2 nn.Linear + q, k, v and output projections of the attention
    assert len(count_onednn_calls) == 6
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    count_onednn_calls.clear()
    model(x).sum().backward()  # training: plain F.linear, gradients reach the parameters
    assert count_onednn_calls == [] and model[0].weight.grad is not None
