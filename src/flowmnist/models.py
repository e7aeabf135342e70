"""The flow model and the four named variants of the original report.

Architectures follow the RealNVP-style MNIST reference (Lippe, UvA DL tutorial 11):

| name           | dequantization              | flow                                                   | params    |
|----------------|-----------------------------|--------------------------------------------------------|-----------|
| `simple`       | uniform                     | 8 checkerboard couplings (32 hidden)                   |   556,312 |
| `vardeq`       | variational (4 couplings,16)| 8 checkerboard couplings (32 hidden)                   |   628,388 |
| `multi-simple` | uniform                     | 2 checker (32) | squeeze | 2 channel (48) | split |      | 1,639,742 |
|                |                             | squeeze | 4 channel (64)                               |           |
| `multi-vardeq` | variational                 | as multi-simple                                        | 1,711,818 |

Each has a class-conditional variant (``build_model(name, conditional=True)``, `train --conditional`):
the same flows under a per-class Gaussian prior (``ClassPrior``), + 2 x 10 x 784 = 15,680 parameters.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .flows import (
    LOG_2PI,
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
NUM_CLASSES = 10  # the digits 0-9: the labels of a conditional model


class ClassPrior(nn.Module):
    """p(z | y): a diagonal Gaussian per class on the flat latent (Glow's ``y_condition``, per dimension)

        log N(z; mu_y, sigma_y) = sum_d [ -(z_d - mu_yd)^2 / (2 sigma_yd^2) - log sigma_yd - log(2 pi) / 2 ],

    sigma = exp(log_scale). ``mean`` and ``log_scale`` (C, D) start at 0, the standard normal, so a
    conditional model starts as its unconditional twin. The flat latent holds the final latent and every
    split's factored-out half, so every prior term of the model is class-conditional. ``log_py`` (C,), a
    buffer saved with the weights, is log p(y): the training labels' frequencies (``set_class_frequencies``;
    uniform until then).
    """

    def __init__(self, num_classes: int, dims: int):
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(num_classes, dims))
        self.log_scale = nn.Parameter(torch.zeros(num_classes, dims))
        self.register_buffer("log_py", torch.full((num_classes,), -math.log(num_classes)))

    @property
    def num_classes(self) -> int:
        return self.mean.shape[0]

    @torch.no_grad()
    def set_class_frequencies(self, labels: Tensor) -> None:
        """log p(y) = log (count of y / N) over ``labels`` (a class that never occurs gets -inf)."""
        counts = torch.bincount(labels.flatten().long().cpu(), minlength=self.num_classes).double()
        self.log_py.copy_((counts / counts.sum()).log())

    @staticmethod
    def _log_normal(z: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
        e = (z - mean) * torch.exp(-log_scale)
        return (-0.5 * (e * e + LOG_2PI) - log_scale).sum(-1)

    def log_prob(self, z: Tensor, y: Tensor) -> Tensor:
        """log N(z; mu_y, sigma_y) per example: z (B, D), labels y (B,) -> (B,)."""
        return self._log_normal(z, self.mean[y], self.log_scale[y])

    def log_prob_all(self, z: Tensor) -> Tensor:
        """log N(z; mu_y, sigma_y) for every class: z (B, D) -> (B, C)."""
        return self._log_normal(z.unsqueeze(1), self.mean, self.log_scale)

    def sample(self, y: Tensor, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """z = mu_y + T sigma_y eps, eps ~ N(0, I): one flat latent (len(y), D) per label."""
        m = self.mean
        eps = torch.randn(len(y), m.shape[1], generator=generator, device=m.device, dtype=m.dtype)
        return self.mean[y] + (eps * temperature) * torch.exp(self.log_scale[y])


class FlowModel(nn.Module):
    """Dequantization, then an ordered list of flows, then a N(0, I) prior on the final latent.

    log p(x) = log N(z) + ldj_dequant + sum_k ldj_k   (a one-sample lower bound on log P(x) for
    discrete x; ``log_prob(x, k)`` tightens it by importance weighting over k noise draws).

    With ``num_classes`` > 0 the model is class-conditional: a ``ClassPrior`` p(z | y) on the flat latent
    replaces N(0, I) for the final latent and the splits' halves. The flows do not depend on y, so one
    pass gives the latent z and the ldj (without prior terms), and every class costs one Gaussian:

        log p(x | y) = log N(z; mu_y, sigma_y) + ldj,
        log p(x)     = logsumexp_y [ log p(x | y) + log p(y) ],
        log p(y | x) = log p(x | y) + log p(y) - log p(x)          (the flow as a Bayes classifier).
    """

    def __init__(self, dequant: Dequantization, flows: list[Flow], image_shape=IMAGE_SHAPE, num_classes: int = 0):
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
        # Registered last, so an unconditional model's parameters, names and their order are unchanged.
        self.prior = ClassPrior(num_classes, self.dims) if num_classes else None

    @property
    def conditional(self) -> bool:
        return self.prior is not None

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

    def dequant_noise(self, x: Tensor, u0: Tensor) -> Tensor:
        """The dequantization noise u ~ q(u | x) in [0, 1) for uint8 images ``x``, from base noise u0 in
        [0, 1) (uniform dequantization: u = u0); the flow sees v = (x + u) / 256."""
        x = self._prep(x)
        return self.dequant.noise(x, u0.to(device=x.device, dtype=x.dtype))[0]

    def log_prob_single(self, x: Tensor, noise: Tensor | None = None, y: Tensor | None = None) -> Tensor:
        """One-sample estimate of the ELBO on log P(x) in nats, shape (B,). x: pixels in 0..255.

        A conditional model gives log p(x | y) for labels ``y`` (B,), and without ``y`` the marginal
        log p(x) = logsumexp_y [log p(x | y) + log p(y)] (one noise draw shared by all classes)."""
        if self.prior is None:
            if y is not None:
                raise ValueError("labels given to an unconditional model")
            z, logp = self.dequant(self._prep(x), noise)
            for flow in self.flows:
                z, ldj = flow(z)
                logp = logp + ldj
            return logp + std_normal_log_prob(z)
        if y is None:
            return torch.logsumexp(self.class_log_probs(x, noise) + self.prior.log_py, dim=1)
        z, ldj = self.latent_and_ldj(x, noise)
        return ldj + self.prior.log_prob(z, y.to(z.device))

    def class_log_probs(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        """log p(x | y) for every class y of a conditional model, shape (B, C), from one pass through the
        dequantization and the flows: log N(z; mu_y, sigma_y) + ldj, the same noise for every class."""
        if self.prior is None:
            raise ValueError("class_log_probs needs a class-conditional model")
        z, ldj = self.latent_and_ldj(x, noise)
        return ldj.unsqueeze(1) + self.prior.log_prob_all(z)

    def log_prob(self, x: Tensor, k: int = 1, y: Tensor | None = None) -> Tensor:
        """Importance-weighted bound with k dequantization samples (Burda et al. 2016):
        log (1/k) sum_i p(x + u_i) / q(u_i|x); k = 1 is the plain ELBO. ``y``: as ``log_prob_single``."""
        if k == 1:
            return self.log_prob_single(x, y=y)
        lp = torch.stack([self.log_prob_single(x, y=y) for _ in range(k)], dim=-1)
        return torch.logsumexp(lp, dim=-1) - math.log(k)

    def bpd(self, x: Tensor, k: int = 1, y: Tensor | None = None) -> Tensor:
        """Bits per dimension of the discrete image: -log2 P(x) / D, shape (B,) (of P(x | y) given ``y``)."""
        return -self.log_prob(x, k, y) / (self.dims * math.log(2))

    def hybrid_bpd(self, x: Tensor, y: Tensor, weight: float = 0.0) -> Tensor:
        """The hybrid objective of Nalisnick et al. 2019 in bits per dimension, shape (B,):

            -( log p(x | y) + weight * log p(y | x) ) / (D log 2),
            log p(y | x) = log_softmax_y [ log p(x | y) + log p(y) ].

        weight = 0 is the conditional bpd. log p(y | x) is nats per image, log p(x | y) hundreds of nats:
        a weight of order D (784) is what makes the classification term count."""
        if not weight:
            return self.bpd(x, y=y)
        lp = self.class_log_probs(x)
        y = y.to(lp.device).unsqueeze(1)
        log_post = torch.log_softmax(lp + self.prior.log_py, dim=1).gather(1, y)
        return -(lp.gather(1, y) + weight * log_post).squeeze(1) / (self.dims * math.log(2))

    def latent_and_ldj(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(flat latent (B, D), ldj (B,)): the final latent and every split's factored-out half (last
        split first, the order ``decode`` reads), and ldj_dequant + the flows' ldj without any prior
        term (a split's N(0, I) term left out). ``noise``: the dequantization's u0, drawn if None."""
        z, ldj = self.dequant(self._prep(x), noise)
        outs = []
        for flow in self.flows:
            if isinstance(flow, Split):
                z, out, _ = flow.split(z)
                outs.append(out)
            else:
                z, l = flow(z)
                ldj = ldj + l
        return torch.cat([z.flatten(1)] + [o.flatten(1) for o in outs[::-1]], dim=1), ldj

    def encode(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        """Image -> flat latent (B, D): the final latent and every split's factored-out half.

        ``noise`` is the dequantization's base noise u0 in [0,1); by default the bin centre u0 = 1/2,
        which makes encoding deterministic and keeps the continuous point away from the bin edges,
        where float rounding in the round trip could flip ``floor`` to the neighbouring value.
        """
        x = self._prep(x)
        return self.latent_and_ldj(x, torch.full_like(x, 0.5) if noise is None else noise)[0]

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
    def sample(
        self,
        n: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        y: int | Tensor | None = None,
    ) -> Tensor:
        """n uint8 images from the model; the prior's std is scaled by ``temperature``.

        A conditional model draws digit ``y`` (an int, or n labels), or y ~ p(y) when ``y`` is None."""
        ref = self._ref()
        if self.prior is None:
            if y is not None:
                raise ValueError("labels given to an unconditional model")
            latent = torch.randn(n, self.dims, generator=generator, device=ref.device, dtype=ref.dtype)
            return self.decode(latent * temperature)
        if y is None:
            y = torch.multinomial(self.prior.log_py.exp(), n, replacement=True, generator=generator)
        y = torch.as_tensor(y, device=ref.device).long().expand(n)
        return self.decode(self.prior.sample(y, temperature, generator))


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


def build_model(name: str, alpha: float = 1e-5, *, fast: bool = False, conditional: bool = False) -> FlowModel:
    """One of the four named variants (see the module docstring); ``conditional``: its class-conditional
    variant (the same flows, and a ``ClassPrior`` over the 10 digits in place of N(0, I)).

    ``fast=True`` builds the CPU fast path (see ``nets``): the same function, the same parameter
    names and shapes and the same initialisation for a given seed, so a state_dict of either loads
    into the other. ``fast=False`` is the plain implementation.
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
    return FlowModel(dequant, flows, num_classes=NUM_CLASSES if conditional else 0)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
