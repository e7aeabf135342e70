"""The flow model (``FlowModel``: dequantization, flows, prior) and the named architectures.

Architectures are data (``ARCHITECTURES``: stages of ``Couplings``, squeezes and splits, and the
dequantization's noise flow) that ``build`` turns into a model. The original report's four follow the
RealNVP-style MNIST reference (Lippe, UvA DL tutorial 11):

| name           | dequantization              | flow                                                   |
|----------------|-----------------------------|--------------------------------------------------------|
| `simple`       | uniform                     | 8 checkerboard couplings (32 hidden)                   |
| `vardeq`       | variational (4 couplings,16)| 8 checkerboard couplings (32 hidden)                   |
| `multi-simple` | uniform                     | 2 checker (32) | squeeze | 2 channel (48) | split |      |
|                |                             | squeeze | 4 channel (64)                               |
| `multi-vardeq` | variational                 | as multi-simple                                        |

The others (wider, Glow steps, mixture-of-logistics couplings, Flow++-style) are variations of
multi-vardeq, each described by its ``Architecture.doc``. Every one's parameter count is pinned in one
place, tests/helpers.py (``PARAMS``).

Each has a class-conditional variant (``build_model(name, prior=PriorSpec("class"))``, `train --conditional`):
the same flows under a per-class Gaussian prior (``ClassPrior``), + 2 x 10 x D parameters (15,680 at 28x28).

A model is built for one image shape (``image_shape``, (1, H, W); MNIST's 28x28 by default): the stages
are the same at every size, only the couplings' masks, the prior and self-attention follow it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .config import MNIST_SHAPE, NUM_CLASSES, PriorSpec, check_shape  # noqa: F401 (NUM_CLASSES: its old home)
from .flows import (
    ActNorm,
    AffineCoupling,
    Coupling,
    Dequantization,
    Flow,
    InvConv1x1,
    MixLogCDFCoupling,
    Split,
    Squeeze,
    channel_mask,
    checkerboard_mask,
)
from .nets import GatedConvNet
from .priors import ClassPrior, Prior, StandardNormalPrior, build_prior  # noqa: F401 (the priors' old home)

NORMAL = PriorSpec()  # N(0, I): the unconditional models


def latent_shapes(flows: list[Flow], image_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Shapes of the flat latent's pieces in the order ``FlowModel.decode`` reads them: the final latent
    first, then each split's factored-out half, last split first."""
    shape, pieces = tuple(image_shape), []
    for f in flows:
        shape = f.out_shape(shape)
        if isinstance(f, Split):
            pieces.append(shape)
    return [shape] + pieces[::-1]


class FlowModel(nn.Module):
    """Dequantization, then an ordered list of flows, then a prior on the flat latent (the final latent
    and every split's factored-out half):

        log p(x | y) = prior.log_prob(latent, y) + ldj_dequant + sum_k ldj_k

    a one-sample lower bound on log P(x) for discrete x; ``log_prob(x, k)`` tightens it by importance
    weighting over k noise draws. The prior is an object passed in (``priors.Prior``; N(0, I) if none): with
    ``prior.num_classes`` > 0, e.g. a ``ClassPrior`` p(z | y), the model is class-conditional, and since the
    flows do not depend on y, one pass gives the latent and the ldj, and every class costs one Gaussian:

        log p(x)     = logsumexp_y [ log p(x | y) + log p(y) ]   (the prior's log_prob without labels),
        log p(y | x) = log p(x | y) + log p(y) - log p(x)          (the flow as a Bayes classifier).
    """

    def __init__(self, dequant: Dequantization, flows: list[Flow], prior: Prior | None = None, image_shape=MNIST_SHAPE):
        super().__init__()
        self.dequant = dequant
        self.flows = nn.ModuleList(flows)
        self.image_shape = tuple(image_shape)
        self.latent_shapes = latent_shapes(self.flows, self.image_shape)
        self.dims = math.prod(self.image_shape)
        # Registered last, so an unconditional model's parameters, names and their order are the flows'.
        self.prior = StandardNormalPrior(self.dims) if prior is None else prior
        if self.prior.dims != self.dims:
            raise ValueError(f"the prior is over {self.prior.dims} dimensions, the model's latent has {self.dims}")

    @property
    def conditional(self) -> bool:
        return self.prior.num_classes > 0

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

    def latent_and_ldj(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(flat latent (B, D), ldj (B,)): the final latent and every split's factored-out half (last
        split first, the order ``decode`` reads), and ldj_dequant + the flows' ldj; the prior scores the
        whole latent, so a split adds its half and no term of its own. ``noise``: the dequantization's
        u0, drawn if None."""
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

    def log_prob_single(self, x: Tensor, noise: Tensor | None = None, y: Tensor | None = None) -> Tensor:
        """One-sample estimate of the ELBO on log P(x) in nats, shape (B,). x: pixels in 0..255.

        A conditional model gives log p(x | y) for labels ``y`` (B,), and without ``y`` the marginal
        log p(x) = logsumexp_y [log p(x | y) + log p(y)] (one noise draw shared by all classes)."""
        z, ldj = self.latent_and_ldj(x, noise)
        return ldj + self.prior.log_prob(z, y)

    def class_log_probs(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        """log p(x | y) for every class y of a conditional model, shape (B, C), from one pass through the
        dequantization and the flows: log N(z; mu_y, sigma_y) + ldj, the same noise for every class."""
        if not self.conditional:
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

    def encode(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        """Image -> flat latent (B, D): the final latent and every split's factored-out half.

        ``noise`` is the dequantization's base noise u0 in [0,1); by default the bin centre u0 = 1/2,
        which makes encoding deterministic and keeps the continuous point away from the bin edges,
        where float rounding in the round trip could flip ``floor`` to the neighbouring value.
        """
        x = self._prep(x)
        return self.latent_and_ldj(x, torch.full_like(x, 0.5) if noise is None else noise)[0]

    def decode(self, latent: Tensor) -> Tensor:
        """Flat latent (B, D) -> uint8 images (B, 1, H, W); the exact inverse of ``encode``
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
        return self.decode(self.prior.sample(n, temperature, generator, y, like=self._ref()))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Data-dependent initialisation (``ActNorm``) from the uint8 images ``x``: one pass, each layer
        initialised on what the layers before it make of the batch. A no-op for a model without ActNorm."""
        if any(isinstance(m, ActNorm) for m in self.modules()):
            self.log_prob_single(x)


# --- Architectures as data: a list of stages that ``build`` turns into flows ---------------------------

SQUEEZE, SPLIT = "squeeze", "split"


@dataclass(frozen=True)
class Couplings:
    """``n`` couplings at the current resolution, masks alternating (the first one keeps the pixels where
    i + j is odd, or the first half of the channels).

    kind: a ``COUPLINGS`` name, "affine" (``AffineCoupling``) or "mixlog" (``MixLogCDFCoupling`` with
    ``components``); hidden: the coupling net's width; mask: a ``MASKS`` name, "checkerboard" or
    "channel"; glow: ActNorm and an invertible 1x1 convolution before each coupling (Glow's step; the 1x1
    convolution needs more than one channel); attention: a self-attention block after each gated block of
    the nets."""

    n: int
    hidden: int
    mask: str = "checkerboard"
    kind: str = "affine"
    components: int = 4
    glow: bool = False
    attention: bool = False
    layers: int = 3


@dataclass(frozen=True)
class Architecture:
    """A flow model as data: the stages from the image to the latent (``Couplings``, ``SQUEEZE`` or
    ``SPLIT``) and, for variational dequantization, the noise flow's couplings (checkerboard, each net
    conditioned on the image)."""

    stages: tuple
    dequant: Couplings | None = None
    doc: str = ""


def _multi(n=(2, 2, 4), hidden=(32, 48, 64), first: dict | None = None, rest: dict | None = None) -> tuple:
    """Multi-scale stages: n[0] checkerboard couplings at full size (28x28 for MNIST), squeeze, n[1] channel
    couplings at half size (14x14), split, squeeze, n[2] channel couplings at a quarter (7x7); ``first`` /
    ``rest``: options of the full-size / later stages."""
    first, rest = first or {}, rest or {}
    return (
        Couplings(n[0], hidden[0], **first),
        SQUEEZE,
        Couplings(n[1], hidden[1], "channel", **rest),
        SPLIT,
        SQUEEZE,
        Couplings(n[2], hidden[2], "channel", **rest),
    )


_MULTI = _multi()
_WIDE = dict(n=(2, 4, 8), hidden=(32, 64, 96))  # capacity where it is cheap: a 7x7 pixel costs 1/16 of a 28x28 one
_VARDEQ = Couplings(4, 16)

ARCHITECTURES: dict[str, Architecture] = {
    # The original report's four (Lippe's tutorial): parameter counts and state_dict names are fixed.
    "simple": Architecture((Couplings(8, 32),), doc="uniform dequantization, 8 checkerboard couplings"),
    "vardeq": Architecture((Couplings(8, 32),), _VARDEQ, doc="variational dequantization, 8 checkerboard couplings"),
    "multi-simple": Architecture(_MULTI, doc="uniform dequantization, multi-scale 28/14/7"),
    "multi-vardeq": Architecture(_MULTI, _VARDEQ, doc="variational dequantization, multi-scale 28/14/7"),
    "multi-vardeq-wide": Architecture(
        _multi(**_WIDE), _VARDEQ, doc="multi-vardeq with 4 couplings of 64 at 14x14 and 8 of 96 at 7x7"
    ),
    "multi-vardeq-mixlog": Architecture(
        _multi(first=dict(kind="mixlog"), rest=dict(kind="mixlog")),
        _VARDEQ,
        doc="multi-vardeq with mixture-of-logistics CDF couplings (4 components)",
    ),
    "multi-vardeq-glow": Architecture(
        _multi(rest=dict(glow=True)),
        _VARDEQ,
        doc="multi-vardeq with ActNorm and invertible 1x1 convolutions before the channel couplings",
    ),
    "multi-vardeq-glow-wide": Architecture(
        _multi(**_WIDE, rest=dict(glow=True)),
        _VARDEQ,
        doc="multi-vardeq-wide with ActNorm and invertible 1x1 convolutions before the channel couplings",
    ),
    "multi-vardeq-glow-deep": Architecture(
        _multi(n=(2, 4, 12), hidden=(32, 64, 96), rest=dict(glow=True)),
        Couplings(4, 32),
        doc="multi-vardeq-glow-wide with 12 Glow steps at 7x7 and a dequantization flow of width 32",
    ),
    "flowpp": Architecture(
        _multi(**_WIDE, first=dict(kind="mixlog"), rest=dict(kind="mixlog", glow=True, attention=True)),
        _VARDEQ,
        doc="Flow++-style: mixture couplings, Glow steps and self-attention at 14x14 and 7x7, wide",
    ),
}
MODELS = ("simple", "vardeq", "multi-simple", "multi-vardeq")  # the original report's four


# A mask by name: (C, H, W) of the coupling's input and whether to invert it -> the mask.
MASKS: dict[str, Callable[[tuple[int, int, int], bool], Tensor]] = {
    "checkerboard": lambda shape, invert: checkerboard_mask(shape[1], shape[2], invert),
    "channel": lambda shape, invert: channel_mask(shape[0], invert),
}
# A coupling kind by name: its class, and the options its constructor and ``net_channels`` take from a spec.
COUPLINGS: dict[str, tuple[type[Coupling], Callable[[Couplings], dict[str, Any]]]] = {
    "affine": (AffineCoupling, lambda spec: {}),
    "mixlog": (MixLogCDFCoupling, lambda spec: {"components": spec.components}),
}
COUPLING_KINDS = tuple(COUPLINGS)


def _coupling(spec: Couplings, i: int, shape: tuple[int, int, int], *, fast: bool, cond_channels: int = 0) -> Coupling:
    """The i-th coupling of ``spec`` for inputs of ``shape`` (C, H, W), its net seeing ``cond_channels``
    extra channels (the image, for the dequantization's noise flow)."""
    if spec.mask not in MASKS:
        raise ValueError(f"unknown mask {spec.mask!r}; choose one of {', '.join(MASKS)}")
    if spec.kind not in COUPLINGS:
        raise ValueError(f"unknown coupling kind {spec.kind!r}; choose one of {', '.join(COUPLINGS)}")
    cls, options = COUPLINGS[spec.kind]
    opts, (c, h, w) = options(spec), shape
    mask = MASKS[spec.mask](shape, i % 2 == 1)
    attention = (h, w) if spec.attention else None
    out = cls.net_channels(c, **opts)
    net = GatedConvNet(c + cond_channels, spec.hidden, out, spec.layers, fast=fast, attention=attention)
    return cls(net, mask, c, **opts)


def _stage(spec: Couplings, shape: tuple[int, int, int], fast: bool) -> list[Flow]:
    flows: list[Flow] = []
    for i in range(spec.n):
        if spec.glow:
            flows.append(ActNorm(shape[0]))
            if shape[0] > 1:
                flows.append(InvConv1x1(shape[0]))
        flows.append(_coupling(spec, i, shape, fast=fast))
    return flows


def build(
    arch: Architecture,
    alpha: float = 1e-5,
    *,
    fast: bool = False,
    prior: PriorSpec = NORMAL,
    image_shape: tuple[int, int, int] = MNIST_SHAPE,
) -> FlowModel:
    """The FlowModel of ``arch`` for images of ``image_shape`` (1, H, W), H and W multiples of 4, under the
    prior ``prior`` describes: stages in order, the shape tracked through squeezes and splits."""
    image_shape = check_shape(image_shape, "image shape")
    noise_flows = None
    if arch.dequant is not None:  # q(u|x): couplings on the noise, each net conditioned on the image (+1 channel)
        noise_flows = [
            _coupling(arch.dequant, i, image_shape, fast=fast, cond_channels=1) for i in range(arch.dequant.n)
        ]
    flows: list[Flow] = []
    shape = image_shape
    for stage in arch.stages:
        if isinstance(stage, Couplings):
            new = _stage(stage, shape, fast)
        elif stage in (SQUEEZE, SPLIT):
            new = [Squeeze() if stage == SQUEEZE else Split()]
        else:
            raise ValueError(f"unknown stage {stage!r}")
        for f in new:
            shape = f.out_shape(shape)
        flows += new
    dequant = Dequantization(alpha, noise_flows)
    # Built after the flows: a prior's random start (class means of a spread) leaves the flows' draws as they were.
    return FlowModel(dequant, flows, build_prior(prior, latent_shapes(flows, image_shape)), image_shape)


def build_model(
    name: str,
    alpha: float = 1e-5,
    *,
    fast: bool = False,
    prior: PriorSpec = NORMAL,
    image_shape: tuple[int, int, int] = MNIST_SHAPE,
) -> FlowModel:
    """The named architecture (``ARCHITECTURES``) for images of ``image_shape`` (MNIST's 1 x 28 x 28 by
    default) under ``prior`` (N(0, I) by default; e.g.
    ``PriorSpec("class")``: its class-conditional variant, the same flows and a ``ClassPrior`` over the 10
    digits, ``Config.prior_spec`` for a run's).

    ``fast=True`` builds the CPU fast path (see ``nets``): the same function, the same parameter
    names and shapes and the same initialisation for a given seed, so a state_dict of either loads
    into the other. ``fast=False`` is the plain implementation.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    return build(ARCHITECTURES[name], alpha, fast=fast, prior=prior, image_shape=image_shape)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
