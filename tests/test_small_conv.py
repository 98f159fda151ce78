"""The matrix path of small 2D convolutions (ddcore.small_conv) against nn.Conv2d."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from damm.networks import DEMO_DENOISER_CONFIG, DAMMDenoiser
from ddcore.small_conv import SmallImageConv2d, matmul_small_convs


def _pair(cin: int, cout: int, kernel: int, bias: bool, stride: int = 1) -> tuple[nn.Conv2d, nn.Conv2d]:
    torch.manual_seed(0)
    ref = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=bias)
    fast = matmul_small_convs(copy.deepcopy(ref), max_pixels=16)
    return ref, fast


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("size", [(4, 4), (2, 8), (8, 8)])
def test_equals_conv2d_forward_and_backward(kernel, bias, size):
    """Output and every gradient equal nn.Conv2d's on maps of <= 16 positions (matrix path) and larger ones."""
    ref, fast = _pair(6, 5, kernel, bias)
    assert type(fast) is SmallImageConv2d
    x = torch.randn(3, 6, *size, requires_grad=True)
    xf = x.detach().clone().requires_grad_()
    assert fast._matrix_path(xf) == (size[0] * size[1] <= 16)
    y, yf = ref(x), fast(xf)
    torch.testing.assert_close(yf, y, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    yf.backward(g)
    torch.testing.assert_close(xf.grad, x.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-5)
    if bias:
        torch.testing.assert_close(fast.bias.grad, ref.bias.grad, atol=1e-5, rtol=1e-5)


def test_hand_computed_3x3_on_2x2():
    """A 3x3 all-ones kernel on a 2x2 map with zero padding sums the whole map at every position; bias is added."""
    conv = matmul_small_convs(nn.Conv2d(1, 1, 3, padding=1), max_pixels=4)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.fill_(0.5)
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert conv._matrix_path(x)
    assert torch.equal(conv(x), torch.full((1, 1, 2, 2), 10.5))


def test_bf16_autocast_matches_conv2d():
    """Under CPU bf16 autocast the result is bf16 and agrees with nn.Conv2d's to bf16 precision."""
    ref, fast = _pair(32, 16, 3, True)
    x = torch.randn(2, 32, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, yf = ref(x), fast(x)
    assert yf.dtype == y.dtype == torch.bfloat16
    torch.testing.assert_close(yf.float(), y.float(), atol=0.05, rtol=0.02)


def test_unsupported_settings_fall_back():
    """Strided, dilated and grouped convolutions and same-size padding strings keep nn.Conv2d's path."""
    x = torch.randn(1, 4, 4, 4)
    for kwargs in ({"stride": 2, "padding": 1}, {"dilation": 2, "padding": 2}, {"groups": 2, "padding": 1}):
        conv = matmul_small_convs(nn.Conv2d(4, 4, 3, **kwargs), max_pixels=16)
        assert not conv._matrix_path(x)
        torch.testing.assert_close(conv(x), nn.Conv2d.forward(conv, x))
    same = matmul_small_convs(nn.Conv2d(4, 4, 3, padding="same"), max_pixels=16)
    assert not same._matrix_path(x)


def test_swap_is_in_place_and_selective():
    """Only exact nn.Conv2d instances change class; state-dict keys stay; 0 is off and a negative value an error."""
    net = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Conv3d(2, 2, 3), nn.Linear(2, 2))
    keys = list(net.state_dict())
    assert matmul_small_convs(net, 0) is net and type(net[0]) is nn.Conv2d
    matmul_small_convs(net, 16)
    assert type(net[0]) is SmallImageConv2d and type(net[1]) is nn.Conv3d
    assert list(net.state_dict()) == keys
    with pytest.raises(ValueError, match="max_pixels"):
        matmul_small_convs(net, -1)


def test_denoiser_outputs_do_not_depend_on_the_setting():
    """The DAMM denoiser with and without the matrix path gives the same branch predictions from the same weights."""
    torch.manual_seed(0)
    plain = DAMMDenoiser(**{**DEMO_DENOISER_CONFIG, "small_conv_max_pixels": 0})
    fast = DAMMDenoiser(**{**DEMO_DENOISER_CONFIG, "small_conv_max_pixels": 16})
    assert not any(isinstance(m, SmallImageConv2d) for m in plain.modules())
    assert any(isinstance(m, SmallImageConv2d) for m in fast.modules())
    fast.load_state_dict(plain.state_dict())
    x = torch.randn(2, plain.in_channels, 16, 16)
    t = torch.tensor([10, 500])
    a, b = plain.forward_all(x, t), fast.forward_all(x, t)
    torch.testing.assert_close(b.eps_uni, a.eps_uni, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.eps_multi, a.eps_multi, atol=1e-5, rtol=1e-5)
