"""The flow model and the four named variants of the original report.

Architectures follow the RealNVP-style MNIST reference (Lippe, UvA DL tutorial 11):

| name           | dequantization              | flow                                                   | params    |
|----------------|-----------------------------|--------------------------------------------------------|-----------|
| `simple`       | uniform                     | 8 checkerboard couplings (32 hidden)                   |   556,312 |
| `vardeq`       | variational (4 couplings,16)| 8 checkerboard couplings (32 hidden)                   |   628,388 |
| `multi-simple` | uniform                     | 2 checker (32) | squeeze | 2 channel (48) | split |      | 1,639,742 |
|                |                             | squeeze | 4 channel (64)                               |           |
| `multi-vardeq` | variational                 | as multi-simple                                        | 1,711,818 |
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .flows import (
    AffineCoupling,
    Dequantization,
    Flow,
    Split,
    Squeeze,
    channel_mask,
    checkerboard_mask,
    std_normal_log_prob,
)
from .nets import GatedConvNet

MODELS = ("simple", "vardeq", "multi-simple", "multi-vardeq")
IMAGE_SHAPE = (1, 28, 28)


class FlowModel(nn.Module):
    """Dequantization, then an ordered list of flows, then a N(0, I) prior on the final latent.

    log p(x) = log N(z) + ldj_dequant + sum_k ldj_k   (a one-sample lower bound on log P(x) for
    discrete x; ``log_prob(x, k)`` tightens it by importance weighting over k noise draws).
    """

    def __init__(self, dequant: Dequantization, flows: list[Flow], image_shape=IMAGE_SHAPE):
        super().__init__()
        self.dequant = dequant
        self.flows = nn.ModuleList(flows)
        self.image_shape = tuple(image_shape)
        # Shapes of the latent pieces in the order decode consumes them: the final latent first,
        # then each split's factored-out half, last split first.
        shape, pieces = self.image_shape, []
        for f in self.flows:
            if isinstance(f, Split):
                shape = f.out_shape(shape)
                pieces.append(shape)
            else:
                shape = f.out_shape(shape)
        self.latent_shapes = [shape] + pieces[::-1]
        self.dims = math.prod(self.image_shape)

    def _ref(self) -> Tensor:
        """A tensor carrying the model's device and float dtype (a flow may have no parameters)."""
        return next(self.parameters(), torch.empty(0))

    @property
    def device(self) -> torch.device:
        return self._ref().device

    @property
    def dtype(self) -> torch.dtype:
        return self._ref().dtype

    def _prep(self, x: Tensor) -> Tensor:
        ref = self._ref()
        return x.to(device=ref.device, dtype=ref.dtype)

    def log_prob_single(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        """One-sample estimate of the ELBO on log P(x) in nats, shape (B,). x: pixels in 0..255."""
        z, logp = self.dequant(self._prep(x), noise)
        for flow in self.flows:
            z, ldj = flow(z)
            logp = logp + ldj
        return logp + std_normal_log_prob(z)

    def log_prob(self, x: Tensor, k: int = 1) -> Tensor:
        """Importance-weighted bound with k dequantization samples (Burda et al. 2016):
        log (1/k) sum_i p(x + u_i) / q(u_i|x); k = 1 is the plain ELBO."""
        if k == 1:
            return self.log_prob_single(x)
        lp = torch.stack([self.log_prob_single(x) for _ in range(k)], dim=-1)
        return torch.logsumexp(lp, dim=-1) - math.log(k)

    def bpd(self, x: Tensor, k: int = 1) -> Tensor:
        """Bits per dimension of the discrete image: -log2 P(x) / D, shape (B,)."""
        return -self.log_prob(x, k) / (self.dims * math.log(2))

    def encode(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        """Image -> flat latent (B, D): the final latent and every split's factored-out half.

        ``noise`` is the dequantization's base noise u0 in [0,1); by default the bin centre u0 = 1/2,
        which makes encoding deterministic and keeps the continuous point away from the bin edges,
        where float rounding in the round trip could flip ``floor`` to the neighbouring value.
        """
        x = self._prep(x)
        z, _ = self.dequant(x, torch.full_like(x, 0.5) if noise is None else noise)
        outs = []
        for flow in self.flows:
            if isinstance(flow, Split):
                z, out, _ = flow.split(z)
                outs.append(out)
            else:
                z, _ = flow(z)
        return torch.cat([z.flatten(1)] + [o.flatten(1) for o in outs[::-1]], dim=1)

    def decode(self, latent: Tensor) -> Tensor:
        """Flat latent (B, D) -> uint8 images (B, 1, 28, 28); the exact inverse of ``encode``
        up to quantisation."""
        pieces, start = [], 0
        for shape in self.latent_shapes:
            n = math.prod(shape)
            pieces.append(latent[:, start : start + n].reshape(-1, *shape))
            start += n
        z, outs = pieces[0], iter(pieces[1:])
        for flow in reversed(self.flows):
            z = flow.inverse(z, next(outs)) if isinstance(flow, Split) else flow.inverse(z)
        return self.dequant.inverse(z)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """n uint8 images from the model; the prior's std is scaled by ``temperature``."""
        ref = self._ref()
        latent = torch.randn(n, self.dims, generator=generator, device=ref.device, dtype=ref.dtype)
        return self.decode(latent * temperature)


def _checker_couplings(n: int, c_in: int, hidden: int, cond: int = 0, c_out: int | None = None, fast: bool = False):
    return [
        AffineCoupling(
            GatedConvNet(c_in + cond, hidden, c_out if c_out is not None else 2 * c_in, fast=fast),
            checkerboard_mask(28, 28, invert=i % 2 == 1),
            c_in,
        )
        for i in range(n)
    ]


def _channel_couplings(n: int, c_in: int, hidden: int, fast: bool = False):
    return [
        AffineCoupling(GatedConvNet(c_in, hidden, fast=fast), channel_mask(c_in, invert=i % 2 == 1), c_in)
        for i in range(n)
    ]


def build_model(name: str, alpha: float = 1e-5, *, fast: bool = False) -> FlowModel:
    """One of the four named variants (see the module docstring).

    ``fast=True`` builds the CPU fast path (see ``nets``): the same function, the same parameter
    names and shapes and the same initialisation for a given seed, so a state_dict of either loads
    into the other. ``fast=False`` is the plain reference implementation.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    noise_flows = None
    if name.endswith("vardeq"):
        # q(u|x): 4 checkerboard couplings on the noise, each conditioned on the image (+1 channel).
        noise_flows = _checker_couplings(4, c_in=1, hidden=16, cond=1, c_out=2, fast=fast)
    dequant = Dequantization(alpha, noise_flows)
    if name.startswith("multi"):
        flows = (
            _checker_couplings(2, 1, 32, fast=fast)
            + [Squeeze()]
            + _channel_couplings(2, 4, 48, fast=fast)
            + [Split(), Squeeze()]
            + _channel_couplings(4, 8, 64, fast=fast)
        )
    else:
        flows = _checker_couplings(8, 1, 32, fast=fast)
    return FlowModel(dequant, flows)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
