"""The coupling networks (flowmnist.nets): each fast module is its plain counterpart's function, with
gradients, eager and compiled."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flowmnist.nets import ConcatELU, FastConcatELU, FastLayerNormChannels, LayerNormChannels


def test_concat_elu_gradcheck_both_layouts():
    x = torch.randn(2, 3, 4, 5, dtype=torch.double)
    for layout in (torch.contiguous_format, torch.channels_last):
        xi = x.contiguous(memory_format=layout).requires_grad_()
        torch.testing.assert_close(FastConcatELU()(xi), ConcatELU()(xi))
        assert torch.autograd.gradcheck(FastConcatELU(), (xi,))


def test_fast_layer_norm_matches_reference():
    ref = LayerNormChannels(6)
    with torch.no_grad():
        ref.gamma.normal_()
        ref.beta.normal_()
    fast = FastLayerNormChannels(6)
    fast.load_state_dict(ref.state_dict())
    x = (3 + 2 * torch.randn(2, 6, 5, 5, dtype=torch.double)).requires_grad_()
    ref.double(), fast.double()
    for xi in (x, x.contiguous(memory_format=torch.channels_last)):
        torch.testing.assert_close(fast(xi), ref(xi))
        g = torch.randn(2, 6, 5, 5, dtype=torch.double)
        gr = torch.autograd.grad(ref(xi), [xi, ref.gamma, ref.beta], g)
        gf = torch.autograd.grad(fast(xi), [xi, fast.gamma, fast.beta], g)
        for a, b in zip(gf, gr, strict=True):
            torch.testing.assert_close(a, b)


def test_elu_helper_matches_formula():
    # The backward of FastConcatELU reads ELU'(u) from ELU(u): 1 for u > 0, ELU(u) + 1 otherwise.
    u = torch.linspace(-3, 3, 13, dtype=torch.double)
    y = F.elu(u)
    d = torch.ops.aten.elu_backward(torch.ones_like(u), 1.0, 1, 1.0, True, y)
    torch.testing.assert_close(d, torch.where(u > 0, torch.ones_like(u), y + 1))


def test_gated_conv_fast_matches_reference_and_gradchecks():
    from flowmnist.nets import GatedConv, _GateFn

    torch.manual_seed(0)
    ref = GatedConv(4, 4).double()
    fast = GatedConv(4, 4, fast=True).double()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 3, 3, dtype=torch.double, requires_grad=True)
    g = torch.randn(2, 4, 3, 3, dtype=torch.double)
    torch.testing.assert_close(fast(x), ref(x))
    for a, b in zip(
        torch.autograd.grad(fast(x), [x, *fast.parameters()], g),
        torch.autograd.grad(ref(x), [x, *ref.parameters()], g),
        strict=True,
    ):
        torch.testing.assert_close(a, b)
    h = torch.randn(2, 8, 3, 3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(_GateFn.apply, (x, h))


def test_one_exp_concat_elu_is_concat_elu():
    from flowmnist.nets import concat_elu_one_exp

    x = torch.randn(2, 3, 4, 5, dtype=torch.double, requires_grad=True)
    torch.testing.assert_close(concat_elu_one_exp(x), ConcatELU()(x))
    assert torch.autograd.gradcheck(concat_elu_one_exp, (x,))
    x0 = torch.zeros(1, 2, 1, 1, dtype=torch.double)  # ELU(0) = 0 from either branch
    assert torch.equal(concat_elu_one_exp(x0), torch.zeros(1, 4, 1, 1, dtype=torch.double))


def test_conv_by_taps_is_the_convolution():
    """The GEMM-and-shifted-sum form of the output convolution computes F.conv2d (padding 1), borders
    included; OutConv takes it only without gradients and where it pays (9 c_out <= c_in)."""
    from flowmnist.nets import OutConv, conv3x3_by_taps

    g = torch.Generator().manual_seed(0)
    for n, c, h, w, o in ((2, 6, 5, 7, 2), (1, 3, 1, 4, 1), (3, 16, 4, 4, 8)):
        x = torch.randn(n, c, h, w, generator=g, dtype=torch.double)
        wt = torch.randn(o, c, 3, 3, generator=g, dtype=torch.double)
        b = torch.randn(o, generator=g, dtype=torch.double)
        torch.testing.assert_close(conv3x3_by_taps(x, wt, b), F.conv2d(x, wt, b, padding=1))
    calls = []
    conv = OutConv(18, 2, kernel_size=3, padding=1)
    conv.by_taps = lambda *a: calls.append(1) or conv3x3_by_taps(*a)
    x = torch.randn(2, 18, 5, 5)
    y = conv(x)  # with gradients: the convolution
    assert calls == [] and y.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(conv(x), y.detach(), rtol=1e-5, atol=1e-5)
    assert calls == [1]
    wide = OutConv(16, 2, kernel_size=3, padding=1)  # 9 * 2 > 16: the convolution even without gradients
    wide.by_taps = conv.by_taps
    with torch.no_grad():
        wide(torch.randn(1, 16, 3, 3))
    assert calls == [1]
