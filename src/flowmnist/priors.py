"""Priors on a model's flat latent (the final latent and every split's factored-out half), behind one
small protocol (``Prior``), and built from a ``PriorSpec`` by ``build_prior``.

Adding a prior: a class with the protocol's members and a ``from_spec(spec, latent_shapes)``
constructor, an entry in ``PRIORS``; a ``PriorSpec.kind`` of that name selects it.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor, nn

from .config import CLASS_LATENTS, PriorSpec
from .flows import LOG_2PI, std_normal_log_prob


class Prior(Protocol):
    """What a model asks of its prior. ``num_classes`` is 0 for an unconditional prior (labels are
    refused), C > 0 for a class-conditional one, which also keeps ``log_py`` (C,), log p(y), and
    ``set_class_frequencies(labels)``."""

    num_classes: int
    dims: int

    def log_prob(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """log p(z | y) per example, z (B, D) -> (B,); without labels the marginal log p(z)."""

    def log_prob_all(self, z: Tensor) -> Tensor:
        """log p(z | y) for every class y, (B, D) -> (B, C)."""

    def sample(
        self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None, y=None, *, like: Tensor
    ) -> Tensor:
        """n flat latents (n, D) with the prior's std scaled by ``temperature``, of class ``y`` if given."""


def _refuse_labels(y) -> None:
    if y is not None:
        raise ValueError("labels given to an unconditional model")


class StandardNormalPrior(nn.Module):
    """p(z) = N(z; 0, I) on the flat latent. ``num_classes`` is 0 (labels are refused). No parameters or
    buffers, so an unconditional model's state_dict holds the flows alone."""

    num_classes = 0

    def __init__(self, dims: int):
        super().__init__()
        self.dims = dims

    @classmethod
    def from_spec(cls, spec: PriorSpec, latent_shapes: list[tuple[int, ...]]) -> StandardNormalPrior:
        return cls(sum(math.prod(s) for s in latent_shapes))

    def log_prob(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        _refuse_labels(y)
        return std_normal_log_prob(z)

    def log_prob_all(self, z: Tensor) -> Tensor:
        raise ValueError("log_prob_all needs a class-conditional prior")

    def sample(
        self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None, y=None, *, like: Tensor
    ) -> Tensor:
        """n flat latents T eps, eps ~ N(0, I), on the device and dtype of ``like``."""
        _refuse_labels(y)
        eps = torch.randn(n, self.dims, generator=generator, device=like.device, dtype=like.dtype)
        return eps * temperature


class ClassPrior(nn.Module):
    """p(z | y): a diagonal Gaussian per class on the first ``class_dims`` dimensions of the flat latent,
    N(0, I) on the rest (Glow's ``y_condition``):

        log p(z | y) = sum_{d < K} log N(z_d; mu_yd, sigma_yd) + sum_{d >= K} log N(z_d; 0, 1),

    sigma = exp(log_scale). The flat latent starts with the final latent, so K = its size puts the class
    means on the top of the multi-scale flow only ("top"), where a few hundred dimensions carry the digit's
    identity and the classifier log p(y | x) reads the deepest features; K = D (the default, "all") makes
    every prior term class-conditional. ``log_scale`` (C, K) starts at 0; ``mean`` (C, K) at 0, the
    standard normal, so that a conditional model starts as its unconditional twin, or with ``spread`` > 0
    drawn from N(0, spread^2): clusters apart from the start; ``fixed`` keeps those means and unit scales
    as they are (FlowGMM's Gaussian mixture, Izmailov et al. 2020, https://arxiv.org/abs/1912.13025), so
    that the flow alone must map each digit to its own cluster, and learned means cannot drift together.
    ``log_py`` (C,), a buffer saved with the weights, is log p(y): the training labels' frequencies
    (``set_class_frequencies``; uniform until then).
    """

    def __init__(
        self, num_classes: int, dims: int, class_dims: int | None = None, spread: float = 0.0, fixed: bool = False
    ):
        super().__init__()
        self.dims = dims
        k = dims if class_dims is None else class_dims
        if not 0 < k <= dims:
            raise ValueError(f"class_dims must be in 1..{dims}, got {k}")
        if fixed and not spread:
            raise ValueError("fixed class means need a spread > 0 (else every class is the same Gaussian)")
        mean = torch.randn(num_classes, k) * spread if spread else torch.zeros(num_classes, k)
        if fixed:  # buffers: the same state_dict names, not trained
            self.register_buffer("mean", mean)
            self.register_buffer("log_scale", torch.zeros(num_classes, k))
        else:
            self.mean = nn.Parameter(mean)
            self.log_scale = nn.Parameter(torch.zeros(num_classes, k))
        self.register_buffer("log_py", torch.full((num_classes,), -math.log(num_classes)))

    @classmethod
    def from_spec(cls, spec: PriorSpec, latent_shapes: list[tuple[int, ...]]) -> ClassPrior:
        """``spec.latent``: "all" the whole flat latent, "top" the final latent (``latent_shapes[0]``)."""
        if spec.latent not in CLASS_LATENTS:
            raise ValueError(f"class_latent must be one of {', '.join(CLASS_LATENTS)}, got {spec.latent!r}")
        top = math.prod(latent_shapes[0]) if spec.latent == "top" else None
        dims = sum(math.prod(s) for s in latent_shapes)
        return cls(spec.num_classes, dims, top, spec.spread, spec.fixed)

    @property
    def num_classes(self) -> int:
        return self.mean.shape[0]

    @property
    def class_dims(self) -> int:
        return self.mean.shape[1]

    @torch.no_grad()
    def set_class_frequencies(self, labels: Tensor) -> None:
        """log p(y) = log (count of y / N) over ``labels`` (a class that never occurs gets -inf)."""
        counts = torch.bincount(labels.flatten().long().cpu(), minlength=self.num_classes).double()
        self.log_py.copy_((counts / counts.sum()).log())

    @staticmethod
    def _log_normal(z: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
        e = (z - mean) * torch.exp(-log_scale)
        return (-0.5 * (e * e + LOG_2PI) - log_scale).sum(-1)

    def _rest(self, z: Tensor) -> Tensor:
        """log N(z_d; 0, 1) summed over the dimensions without class means, (B,)."""
        return std_normal_log_prob(z[:, self.class_dims :])

    def log_prob(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """log p(z | y) per example: z (B, D), labels y (B,) -> (B,); without labels the marginal
        log sum_y p(z | y) p(y)."""
        if y is None:
            return torch.logsumexp(self.log_prob_all(z) + self.log_py, dim=1)
        y, k = y.to(z.device), self.class_dims
        return self._log_normal(z[:, :k], self.mean[y], self.log_scale[y]) + self._rest(z)

    def log_prob_all(self, z: Tensor) -> Tensor:
        """log p(z | y) for every class: z (B, D) -> (B, C)."""
        head = self._log_normal(z[:, None, : self.class_dims], self.mean, self.log_scale)
        return head + self._rest(z).unsqueeze(1)

    def sample(
        self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None, y=None, *, like: Tensor
    ) -> Tensor:
        """z = mu_y + T sigma_y eps on the class dimensions, T eps on the rest, eps ~ N(0, I): n flat
        latents (n, D) of digit ``y`` (an int or n labels), or y ~ p(y) when ``y`` is None. (``like``: the
        shared interface; the means fix the device.)"""
        m, k = self.mean, self.class_dims
        if y is None:
            y = torch.multinomial(self.log_py.exp(), n, replacement=True, generator=generator)
        y = torch.as_tensor(y, device=m.device).long().expand(n)
        eps = torch.randn(n, self.dims, generator=generator, device=m.device, dtype=m.dtype) * temperature
        return torch.cat([self.mean[y] + eps[:, :k] * torch.exp(self.log_scale[y]), eps[:, k:]], dim=1)


PRIORS: dict[str, type] = {"normal": StandardNormalPrior, "class": ClassPrior}


def build_prior(spec: PriorSpec, latent_shapes: list[tuple[int, ...]]) -> Prior:
    """The prior ``spec`` describes, for a flow whose latent pieces have ``latent_shapes`` (the final
    latent first; ``models.latent_shapes``)."""
    if spec.kind not in PRIORS:
        raise ValueError(f"unknown prior {spec.kind!r}; choose one of {', '.join(PRIORS)}")
    return PRIORS[spec.kind].from_spec(spec, latent_shapes)
