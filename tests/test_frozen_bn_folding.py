"""FrozenBatchNorm folding: same outputs, same state, training path untouched."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, FrozenBatchNorm2d

from segclip_d2.predict.frozen_bn_folding import Conv2dFoldedFrozenBN, enable_frozen_bn_folding


def _block(seed=0, bias=False):
    torch.manual_seed(seed)
    seq = torch.nn.Sequential(
        Conv2d(3, 8, 3, padding=1, bias=bias, norm=FrozenBatchNorm2d(8), activation=F.relu),
        Conv2d(8, 4, 1, norm=torch.nn.GroupNorm(2, 4)),  # not frozen BN: left alone
        Conv2d(4, 4, 1),  # no norm: left alone
    )
    bn = seq[0].norm
    bn.weight.uniform_(0.5, 2.0)
    bn.bias.normal_()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.2, 3.0)
    return seq


def test_folding_changes_only_frozen_bn_convs_and_keeps_state():
    seq = _block()
    keys = list(seq.state_dict())
    assert enable_frozen_bn_folding(seq) == 1
    assert type(seq[0]) is Conv2dFoldedFrozenBN and type(seq[1]) is Conv2d
    assert list(seq.state_dict()) == keys


def test_folded_eval_equals_unfolded_and_training_path_is_unchanged():
    x = torch.randn(2, 3, 9, 7)
    for bias in (False, True):
        plain, folded = _block(bias=bias).eval(), _block(bias=bias).eval()
        enable_frozen_bn_folding(folded)
        with torch.no_grad():
            expected = plain(x)
            torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)
            assert getattr(folded[0], "_folded_cache", None) is not None
        # with autograd the un-folded conv -> norm path runs and gradients reach the conv
        out = folded(x)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        out.sum().backward()
        assert folded[0].weight.grad is not None


def test_folded_weights_follow_in_place_updates_and_loaded_state():
    folded = _block().eval()
    enable_frozen_bn_folding(folded)
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        folded(x)
        folded[0].weight.mul_(2.0)  # an optimizer step modifies parameters in place
        folded[0].norm.running_var.mul_(4.0)
        plain = _block().eval()
        plain.load_state_dict(folded.state_dict())
        torch.testing.assert_close(folded(x), plain(x), rtol=1e-5, atol=1e-5)
        folded.load_state_dict(_block(seed=5).state_dict())
        torch.testing.assert_close(folded(x), _block(seed=5).eval()(x), rtol=1e-5, atol=1e-5)
