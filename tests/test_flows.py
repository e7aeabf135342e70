"""The flow contract, proved on every layer: shapes, finite values, exact round trip, and ldj equal to
log|det| of the autograd Jacobian (tiny float64 inputs)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flowmnist.flows import (
    AffineCoupling,
    Dequantization,
    Logit,
    Sigmoid,
    Split,
    Squeeze,
    channel_mask,
    checkerboard_mask,
    std_normal_log_prob,
)
from flowmnist.nets import GatedConvNet

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
