"""The flow contract, proved on every layer: shapes, finite values, exact round trip, and ldj equal to
log|det| of the autograd Jacobian (tiny float64 inputs)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flowmnist.flows import (
    ActNorm,
    AffineCoupling,
    Dequantization,
    InvConv1x1,
    Logit,
    MixLogCDFCoupling,
    Sigmoid,
    Split,
    Squeeze,
    channel_mask,
    checkerboard_mask,
    std_normal_log_prob,
)
from flowmnist.nets import GatedAttention, GatedConvNet

H = W = 4  # tiny images: the full Jacobian is at most 16 x 16 (or 64 x 64 for 4 channels)


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    """Non-zero weights everywhere (the nets' zero-initialised output would make couplings the
    identity and the test vacuous)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return module


def _coupling(mask, c_in, cond=0, c_out=None):
    return _randomise(AffineCoupling(GatedConvNet(c_in + cond, 8, c_out, num_layers=1), mask, c_in), 1)


def _mixlog(mask, c_in, components=3, cond=0, attention=None):
    out = MixLogCDFCoupling.net_channels(c_in, components)
    net = GatedConvNet(c_in + cond, 8, out, num_layers=1, attention=attention)
    return _randomise(MixLogCDFCoupling(net, mask, c_in, components), 2)


def _actnorm(c):
    layer = _randomise(ActNorm(c), 3)
    layer.initialized.fill_(True)  # the randomised values stand; data-dependent init is tested on its own
    return layer


# name -> (layer factory, input shape (C, H, W), conditioning channels, input domain)
LAYERS = {
    "logit": (lambda: Logit(1e-3), (1, H, W), 0, "unit"),
    "sigmoid": (lambda: Sigmoid(), (1, H, W), 0, "real"),
    "coupling-checkerboard": (lambda: _coupling(checkerboard_mask(H, W), 1), (1, H, W), 0, "real"),
    "coupling-checkerboard-inv": (lambda: _coupling(checkerboard_mask(H, W, True), 1), (1, H, W), 0, "real"),
    "coupling-channel": (lambda: _coupling(channel_mask(4), 4), (4, 2, 2), 0, "real"),
    "coupling-channel-inv": (lambda: _coupling(channel_mask(4, True), 4), (4, 2, 2), 0, "real"),
    "coupling-conditional": (lambda: _coupling(checkerboard_mask(H, W), 1, cond=1, c_out=2), (1, H, W), 1, "real"),
    "squeeze": (lambda: Squeeze(), (1, H, W), 0, "real"),
    "mixlog-checkerboard": (lambda: _mixlog(checkerboard_mask(H, W), 1), (1, H, W), 0, "real"),
    "mixlog-channel-inv": (lambda: _mixlog(channel_mask(4, True), 4), (4, 2, 2), 0, "real"),
    "mixlog-many-components": (lambda: _mixlog(checkerboard_mask(H, W, True), 1, 12), (1, H, W), 0, "real"),
    "mixlog-conditional": (lambda: _mixlog(checkerboard_mask(H, W), 1, cond=1), (1, H, W), 1, "real"),
    "mixlog-attention": (lambda: _mixlog(channel_mask(4), 4, attention=(2, 2)), (4, 2, 2), 0, "real"),
    "actnorm": (lambda: _actnorm(4), (4, 2, 2), 0, "real"),
    "invconv1x1": (lambda: _randomise(InvConv1x1(4), 4), (4, 2, 2), 0, "real"),
}


def _input(shape, domain, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    return torch.rand(batch, *shape, generator=g, dtype=torch.float64) if domain == "unit" else x


def _call(layer, x, cond, inverse=False):
    kw = {"cond": cond} if cond is not None else {}
    return layer.inverse(x, **kw) if inverse else layer(x, **kw)


def _jacobian_logdet(fn, x1):
    """log|det dfn/dx| for a single example x1 (1, C, H, W)."""
    jac = torch.autograd.functional.jacobian(lambda v: fn(v.view_as(x1)).flatten(), x1.flatten())
    sign, logabs = torch.linalg.slogdet(jac)
    assert sign != 0
    return logabs


@pytest.mark.parametrize("name", list(LAYERS))
def test_flow_contract(name):
    make, shape, cond_ch, domain = LAYERS[name]
    layer = make().double()
    x = _input(shape, domain)
    cond = torch.randn(x.shape[0], cond_ch, *shape[1:], dtype=torch.float64) if cond_ch else None

    z, ldj = _call(layer, x, cond)
    assert ldj.shape == (x.shape[0],)
    assert z.shape == (x.shape[0], *layer.out_shape(shape))
    assert torch.isfinite(z).all() and torch.isfinite(ldj).all()

    x_back = _call(layer, z, cond, inverse=True)
    torch.testing.assert_close(x_back, x, rtol=1e-9, atol=1e-9)

    for i in range(x.shape[0]):
        c = cond[i : i + 1] if cond is not None else None
        expected = _jacobian_logdet(lambda v, c=c: _call(layer, v, c)[0], x[i : i + 1])
        torch.testing.assert_close(ldj[i], expected, rtol=1e-8, atol=1e-8)


def test_couplings_are_not_identity():
    """Guards the contract test against a vacuous pass: the randomised couplings move the input."""
    make, shape, _, domain = LAYERS["coupling-checkerboard"]
    layer = make().double()
    x = _input(shape, domain)
    z, ldj = layer(x)
    assert (z - x).abs().max() > 1e-3 and ldj.abs().max() > 1e-3


@pytest.mark.parametrize("variational", [False, True], ids=["uniform", "variational"])
def test_dequantization_contract(variational):
    """For fixed pixels x, the map from base noise u0 to z is a bijection whose log-Jacobian is the
    layer's ldj, i.e. -D log 256 - log q(u|x) + the logit's log-Jacobian."""
    noise_flows = (
        [_coupling(checkerboard_mask(H, W, i % 2 == 1), 1, cond=1, c_out=2) for i in range(2)] if variational else None
    )
    layer = Dequantization(1e-3, noise_flows).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 1, H, W), generator=g).double()
    u0 = torch.rand(x.shape, generator=g, dtype=torch.float64) * 0.98 + 0.01

    z, ldj = layer(x, noise=u0)
    assert ldj.shape == (3,) and torch.isfinite(z).all() and torch.isfinite(ldj).all()
    assert torch.equal(layer.inverse(z), x.to(torch.uint8))
    for i in range(3):
        expected = _jacobian_logdet(lambda v, i=i: layer(x[i : i + 1], noise=v)[0], u0[i : i + 1])
        torch.testing.assert_close(ldj[i], expected, rtol=1e-8, atol=1e-8)


def test_split_contract():
    """Split keeps the first half of the channels and scores the rest under N(0, I)."""
    x = _input((4, 2, 2), "real")
    split = Split()
    kept, logp = split(x)
    assert kept.shape == (3, 2, 2, 2) and split.out_shape((4, 2, 2)) == (2, 2, 2)
    torch.testing.assert_close(logp, std_normal_log_prob(x[:, 2:]))
    manual = (-0.5 * x[:, 2:] ** 2 - 0.5 * math.log(2 * math.pi)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(logp, manual)
    _, out, _ = split.split(x)
    assert torch.equal(split.inverse(kept, out), x)


def test_squeeze_pinned():
    """Squeeze on a hand-written 1x4x4 image: channel 2*di + dj holds offset (di, dj) of each 2x2 block."""
    x = torch.arange(16.0).view(1, 1, 4, 4)
    # x = [[ 0,  1,  2,  3],
    #      [ 4,  5,  6,  7],
    #      [ 8,  9, 10, 11],
    #      [12, 13, 14, 15]]
    expected = torch.tensor(
        [
            [[0.0, 2.0], [8.0, 10.0]],  # (0, 0): top-left of each block
            [[1.0, 3.0], [9.0, 11.0]],  # (0, 1): top-right
            [[4.0, 6.0], [12.0, 14.0]],  # (1, 0): bottom-left
            [[5.0, 7.0], [13.0, 15.0]],  # (1, 1): bottom-right
        ]
    ).unsqueeze(0)
    z, ldj = Squeeze()(x)
    assert torch.equal(z, expected) and torch.equal(ldj, torch.zeros(1))
    assert torch.equal(Squeeze().inverse(z), x)


def test_dequantize_quantize_every_value():
    """All 256 pixel values survive dequantization and quantisation in float32, for noise anywhere in
    the bin but within 1e-4 of its edges: float32 resolves values near 256 to ~1.5e-5, so a point
    closer to an edge than that can round into the neighbouring bin (which is why encode() uses the
    bin centre)."""
    x = torch.arange(256.0).view(1, 1, 16, 16).repeat(64, 1, 1, 1)
    layer = Dequantization()
    g = torch.Generator().manual_seed(0)
    noise = 1e-4 + torch.rand(x.shape, generator=g) * (1 - 2e-4)
    noise[0] = 1e-4  # near the lower edge of every bin
    noise[1] = 1 - 1e-4  # near the upper edge
    noise[2] = 0.5  # the bin centre
    z, _ = layer(x, noise=noise)
    assert torch.equal(layer.inverse(z), x.to(torch.uint8))


def test_checkerboard_and_channel_masks():
    m = checkerboard_mask(2, 3)
    assert torch.equal(m[0, 0], torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]))
    assert torch.equal(checkerboard_mask(2, 3, invert=True), 1 - m)
    assert torch.equal(channel_mask(4).flatten(), torch.tensor([1.0, 1.0, 0.0, 0.0]))


def _tail_mixlog(scale: float) -> MixLogCDFCoupling:
    """A mixture coupling on 1 x 4 x 4 inputs with narrow, spread components (log s = -3, means up to
    +-2 scale): its CDF saturates within a few units of the means, so inputs of +-20 sit in the tails."""
    layer = _mixlog(checkerboard_mask(H, W), 1, components=5)
    with torch.no_grad():
        out = layer.net.net[-1]
        out.weight.mul_(0.01)
        k = layer.components
        out.bias.copy_(torch.cat([torch.zeros(2 + k), torch.linspace(-2, 2, k) * scale, torch.full((k,), -3.0)]))
    return layer.double()


@pytest.mark.parametrize("scale", [1.0, 5.0])
def test_mixlog_inverse_in_the_tails(scale):
    """The bisection inverse recovers inputs far out in the tails of the mixture (beyond every mean by 1 to
    30 units, 20 to 600 component scales: F within e^-20 of 0 or 1, and much closer), to float64
    precision, and the ldj there matches autograd. (Between components that lie hundreds of scales apart
    F is flat to float precision, and no inverse can recover x there.)"""
    layer = _tail_mixlog(scale)
    far = 2 * scale + torch.tensor([1.0, 2.0, 5.0, 30.0])
    x = torch.cat([-far, far, -far, far]).view(1, 1, H, W).double()
    x = torch.cat([x, -x])
    z, ldj = layer(x)
    assert torch.isfinite(z).all() and torch.isfinite(ldj).all()
    torch.testing.assert_close(layer.inverse(z), x, rtol=1e-10, atol=1e-10)
    expected = _jacobian_logdet(lambda v: layer(v)[0], x[:1])
    torch.testing.assert_close(ldj[0], expected, rtol=1e-8, atol=1e-8)


def test_mixlog_starts_as_identity():
    """A zero-initialised net (as every model builds it) makes the mixture coupling the identity, ldj 0."""
    out = MixLogCDFCoupling.net_channels(1, 4)
    layer = MixLogCDFCoupling(GatedConvNet(1, 8, out, num_layers=1), checkerboard_mask(H, W), 1, 4).double()
    x = _input((1, H, W), "real")
    z, ldj = layer(x)
    torch.testing.assert_close(z, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ldj, torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-12)


def test_actnorm_data_dependent_init():
    """The first batch comes out with zero mean and unit variance per channel; ldj = H W sum log scale;
    a second batch does not re-initialise."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 3, 5, 5, generator=g) * torch.tensor([0.1, 2.0, 7.0]).view(1, 3, 1, 1) + 3).double()
    layer = ActNorm(3).double()
    z, ldj = layer(x)
    assert bool(layer.initialized)
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-9)
    torch.testing.assert_close(
        z.std(dim=(0, 2, 3), unbiased=False), torch.ones(3, dtype=torch.float64), rtol=1e-4, atol=0
    )
    expected = 25 * -torch.log(x.std(dim=(0, 2, 3), unbiased=False) + 1e-6).sum()
    torch.testing.assert_close(ldj, expected.expand(64))
    before = layer.bias.detach().clone()
    layer(x * 3 + 1)
    assert torch.equal(layer.bias, before)


def test_invconv_ldj_is_slogdet_of_weight():
    """log|det W| from the LU factors equals slogdet of the assembled 4 x 4 weight, times H W."""
    layer = _randomise(InvConv1x1(4), 5).double()
    sign, logabs = torch.linalg.slogdet(layer.weight())
    assert sign != 0
    _, ldj = layer(_input((4, 3, 2), "real"))
    torch.testing.assert_close(ldj, (6 * logabs).expand(3))


def test_invconv_starts_as_a_rotation():
    torch.manual_seed(0)
    w = InvConv1x1(8).weight()
    torch.testing.assert_close(w @ w.T, torch.eye(8), rtol=0, atol=1e-5)


def test_attention_block_shape_and_position():
    """The attention block keeps the shape, and its position embedding makes it depend on where a
    pixel is: the same values shifted by one position do not give shifted outputs."""
    torch.manual_seed(0)
    block = _randomise(GatedAttention(8, (3, 3)), 6).double()
    x = _input((8, 3, 3), "real")
    y = block(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    shifted = block(torch.roll(x, 1, dims=3))
    assert (torch.roll(y, 1, dims=3) - shifted).abs().max() > 1e-3
