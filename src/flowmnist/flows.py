"""Flow layers under one contract.

Every layer is a ``Flow``: an invertible map from the data side to the latent side,

    forward(x) -> (z, ldj)     z = f(x),  ldj = log |det df/dx| per example, shape (batch,)
    inverse(z) -> x            x = f^{-1}(z)

so that a model's log-likelihood is one loop, log p(x) = log p_prior(z) + sum of ldj (change of
variables). Two layers bend the contract in a documented way, as in SurVAE flows (Nielsen et al. 2020):

* ``Dequantization`` maps discrete pixels x in {0..255} to a continuous z; its ldj is the
  log-density correction of the variational bound log P(x) >= E_q[log p(x + u) - log q(u|x)], i.e.
  -D log 256 (the bin width) - log q(u|x) (0 for uniform noise) + the logit transform's log-Jacobian.
  Its inverse quantises (floor), so it is a left inverse only.
* ``Split`` sets half of the channels aside as part of the latent (Dinh et al. 2017, RealNVP
  multi-scale). A model keeps one flat latent: ``FlowModel.latent_and_ldj`` collects every split's half
  with the final latent, the prior scores that latent as a whole (so a class prior can reach every
  dimension), and ``FlowModel.decode`` hands each half back to ``Split.inverse(z, z_out)``. Alone, the
  layer's ``forward`` gives (kept half, log N(set-aside half; 0, I)), the half's density in the ldj's
  place: what the model computes under the N(0, I) prior, and what the contract test checks.

Couplings share one base, ``Coupling`` (mask, conditioning input, net, bounded log-scale); a kind of
coupling adds only its elementwise map and its inverse.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOG_2PI = math.log(2 * math.pi)


def _sum(t: Tensor) -> Tensor:
    """Sum over every dimension but the batch: per-example ldj of shape (B,)."""
    return t.flatten(1).sum(1)


def std_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I), summed per example."""
    return _sum(-0.5 * (z * z + LOG_2PI))


class Flow(nn.Module):
    """An invertible layer: ``forward(x) -> (z, ldj)`` (data to latent) and ``inverse(z) -> x``.

    ``ldj`` is log |det dz/dx| per example, shape (batch,). ``out_shape`` maps a per-example input
    shape (C, H, W) to the output shape; only layers that change shape override it.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def inverse(self, z: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape


class Logit(Flow):
    """(0,1) -> R:  z = logit(alpha/2 + (1 - alpha) v).

    The squeeze by alpha keeps the logit finite at v = 0 (RealNVP, Dinh et al. 2017, sec. 4.1,
    https://arxiv.org/abs/1605.08803).
    ldj = D log(1 - alpha) + sum(-log s - log(1 - s)),  s = alpha/2 + (1 - alpha) v,
    written as softplus(z) + softplus(-z) = -log s - log(1 - s) for stability.
    """

    def __init__(self, alpha: float = 1e-5):
        super().__init__()
        self.alpha = alpha

    def forward(self, v: Tensor) -> tuple[Tensor, Tensor]:
        s = self.alpha / 2 + (1 - self.alpha) * v
        z = torch.log(s) - torch.log1p(-s)
        ldj = _sum(F.softplus(z) + F.softplus(-z)) + v[0].numel() * math.log1p(-self.alpha)
        return z, ldj

    def inverse(self, z: Tensor) -> Tensor:
        return (torch.sigmoid(z) - self.alpha / 2) / (1 - self.alpha)


class Sigmoid(Flow):
    """R -> (0,1):  z = sigmoid(x),  ldj = sum(log s(x) + log s(-x)) = -sum(softplus(-x) + softplus(x)).

    Logit's inverse (RealNVP, https://arxiv.org/abs/1605.08803), where a layer needs (0, 1) values."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return torch.sigmoid(x), -_sum(F.softplus(x) + F.softplus(-x))

    def inverse(self, z: Tensor) -> Tensor:
        return torch.log(z) - torch.log1p(-z)


def checkerboard_mask(h: int, w: int, invert: bool = False) -> Tensor:
    """(1,1,h,w) mask, 1 where (i + j) is odd: the pixels a coupling keeps (and conditions on)."""
    i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    mask = ((i + j) % 2).float().view(1, 1, h, w)
    return 1 - mask if invert else mask


def channel_mask(c: int, invert: bool = False) -> Tensor:
    """(1,c,1,1) mask, 1 on the first half of the channels."""
    mask = torch.cat([torch.ones(c // 2), torch.zeros(c - c // 2)]).view(1, c, 1, 1)
    return 1 - mask if invert else mask


class Coupling(Flow):
    """A masked coupling (RealNVP, Dinh et al. 2017, https://arxiv.org/abs/1605.08803): the masked part
    x * m passes through and, with the conditioning input, is all the net sees; the net gives every free
    element the parameters theta of a monotone elementwise map g:

        theta = net(x * m [, cond]),   z = x * m + (1 - m) g(x; theta),   ldj = sum (1 - m) log g'(x; theta)

    The first of theta is a log-scale, bounded softly as s <- tanh(s / e^c) e^c by a learnable e^c per
    channel (Lippe's tutorial; Flow++ uses a similar soft clamp): it keeps exp(s) from exploding early in
    training. ``cond`` (e.g. the image, for variational dequantization) is concatenated to the net's input.
    Since the masked part of z equals that of x, the inverse gives the net the same input as the forward.

    A kind of coupling implements ``net_channels`` (the net's output channels), ``_unpack`` (the net's
    output -> the raw log-scale and the rest of theta) and the elementwise ``_map`` (x -> (g(x),
    log g'(x))) and ``_unmap`` (z -> g^{-1}(z)).
    """

    def __init__(self, net: nn.Module, mask: Tensor, c_in: int):
        super().__init__()
        self.net = net
        self.scale_factor = nn.Parameter(torch.zeros(c_in))
        self.register_buffer("mask", mask)

    def _params(self, x: Tensor, cond: Tensor | None) -> tuple[Tensor, ...]:
        """theta for every element of x: the bounded log-scale first."""
        h = x * self.mask
        if cond is not None:
            h = torch.cat([h, cond], dim=1)
        s, *rest = self._unpack(self.net(h), x)
        fac = self.scale_factor.exp().view(1, -1, 1, 1)
        return (torch.tanh(s / fac) * fac, *rest)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z, log_grad = self._map(x, *self._params(x, cond))
        free = 1 - self.mask
        return x * self.mask + free * z, _sum(free * log_grad)

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        return z * self.mask + (1 - self.mask) * self._unmap(z, *self._params(z, cond))

    def _unpack(self, out: Tensor, x: Tensor) -> tuple[Tensor, ...]:  # pragma: no cover - interface
        raise NotImplementedError

    def _map(self, x: Tensor, *theta: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def _unmap(self, z: Tensor, *theta: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class AffineCoupling(Coupling):
    """Affine coupling (RealNVP): g(x) = (x + t) exp(s), log g' = s; the net gives s and t per channel."""

    @staticmethod
    def net_channels(c_in: int) -> int:
        return 2 * c_in

    def _unpack(self, out: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        return out.chunk(2, dim=1)

    def _map(self, x: Tensor, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return (x + t) * torch.exp(s), s

    def _unmap(self, z: Tensor, s: Tensor, t: Tensor) -> Tensor:
        return z * torch.exp(-s) - t

    def _scale_shift(self, x: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor]:
        """(s, t) on the free elements, 0 on the masked ones (what the codec's integer lifting reads)."""
        s, t = self._params(x, cond)
        free = 1 - self.mask
        return s * free, t * free


class Squeeze(Flow):
    """2x2 space-to-depth: (C, H, W) -> (4C, H/2, W/2); a permutation, so ldj = 0 (RealNVP,
    https://arxiv.org/abs/1605.08803).

    Channel c*4 + 2*di + dj of the output holds input channel c at offset (di, dj) of each 2x2 block.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, c, h, w = x.shape
        z = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return z.reshape(b, 4 * c, h // 2, w // 2), x.new_zeros(b)

    def inverse(self, z: Tensor) -> Tensor:
        b, c, h, w = z.shape
        x = z.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(b, c // 4, 2 * h, 2 * w)

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        c, h, w = shape
        return (4 * c, h // 2, w // 2)


class Split(Flow):
    """Set the second half of the channels aside as latent (RealNVP's multi-scale architecture,
    https://arxiv.org/abs/1605.08803).

    ``split(x) -> (x_kept, x_out, log N(x_out; 0, I))``: a model keeps x_out in its flat latent for the
    prior to score (see the module's docstring); ``forward(x) -> (x_kept, log N(x_out))`` is the layer on
    its own, the half's standard-normal density in the ldj's place; ``inverse(z, z_out)`` puts the half
    back (drawn from N(0, I) if not given).
    """

    def split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        kept, out = x.chunk(2, dim=1)
        return kept, out, std_normal_log_prob(out)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        kept, _, logp = self.split(x)
        return kept, logp

    def inverse(self, z: Tensor, z_out: Tensor | None = None) -> Tensor:
        if z_out is None:  # a sample from the prior
            z_out = torch.randn_like(z)
        return torch.cat([z, z_out], dim=1)

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        c, h, w = shape
        if c % 2:
            raise ValueError(f"Split needs an even channel count, got {c}")
        return (c // 2, h, w)


class Dequantization(Flow):
    """Discrete pixels {0..255} -> continuous logit space, uniform or variational.

    Uniform (Theis et al. 2016, https://arxiv.org/abs/1511.01844): u ~ U[0,1)^D.  Variational (Flow++,
    Ho et al. 2019, https://arxiv.org/abs/1902.00275):
    u = sigmoid(g(logit(u0); x)), u0 ~ U[0,1)^D, with g a stack of checkerboard couplings conditioned
    on the image, so q(u|x) = 1 / |det du/du0|.  Then v = (x + u) / 256 and z = logit(v).

        ldj = log|det du/du0|  (= -log q(u|x); 0 for uniform)  - D log 256  + logit ldj

    With ``noise`` = u0 given, the map u0 -> z is a bijection whose log-Jacobian is exactly ``ldj``
    (what the contract test checks); log N(z) + ldj of the whole model is then a one-sample
    unbiased estimate of the variational lower bound on log P(x).
    """

    def __init__(self, alpha: float = 1e-5, noise_flows: list[AffineCoupling] | None = None):
        super().__init__()
        self.logit = Logit(alpha)
        self.noise_flows = nn.ModuleList(noise_flows or [])
        self.noise_logit = Logit(alpha)
        self.noise_sigmoid = Sigmoid()

    @property
    def variational(self) -> bool:
        return len(self.noise_flows) > 0

    def noise(self, x: Tensor, u0: Tensor) -> tuple[Tensor, Tensor]:
        """u0 ~ U[0,1) -> u ~ q(u|x); returns (u, log|det du/du0|) = (u, -log q(u|x))."""
        if not self.variational:
            return u0, x.new_zeros(x.shape[0])
        cond = x / 255 * 2 - 1  # the image, scaled to [-1, 1], conditions every noise coupling
        h, ldj = self.noise_logit(u0)
        for flow in self.noise_flows:
            h, l = flow(h, cond=cond)
            ldj = ldj + l
        u, l = self.noise_sigmoid(h)
        return u, ldj + l

    def forward(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x: float tensor of integer pixel values in [0, 255]; noise: u0 in [0,1), drawn if None."""
        u0 = torch.rand_like(x) if noise is None else noise
        u, ldj = self.noise(x, u0)
        z, l = self.logit((x + u) / 256)
        return z, ldj + l - x[0].numel() * math.log(256)

    def inverse(self, z: Tensor) -> Tensor:
        """Quantise: x = floor(256 v), clamped to 0..255, as uint8."""
        v = self.logit.inverse(z)
        return torch.floor(v * 256).clamp(0, 255).to(torch.uint8)


def _mixture_log_cdf_sf_pdf(x: Tensor, log_pi: Tensor, mu: Tensor, log_s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(log F(x), log (1 - F(x)), log F'(x)) of a mixture of logistics, components along dim 2:

        F(x) = sum_k pi_k sigmoid((x - mu_k) / s_k),   F'(x) = sum_k pi_k sigmoid(t_k) sigmoid(-t_k) / s_k,

    each as a logsumexp of log-sigmoids, finite far into the tails where F rounds to 0 or 1."""
    t = (x.unsqueeze(2) - mu) * torch.exp(-log_s)
    ls_pos, ls_neg = F.logsigmoid(t), F.logsigmoid(-t)
    log_cdf = torch.logsumexp(log_pi + ls_pos, dim=2)
    log_sf = torch.logsumexp(log_pi + ls_neg, dim=2)
    log_pdf = torch.logsumexp(log_pi + ls_pos + ls_neg - log_s, dim=2)
    return log_cdf, log_sf, log_pdf


class MixLogCDFCoupling(Coupling):
    """Mixture-of-logistics CDF coupling of Flow++ (Ho et al. 2019, https://arxiv.org/abs/1902.00275):

        a, b, pi, mu, s = net(x * m [, cond])            (per free element, K mixture components)
        g(x) = logit(F(x; pi, mu, s)) * exp(a) + b,      log g'(x) = log F'(x) - log F(x) - log(1 - F(x)) + a

    F is a mixture of K logistic CDFs, so logit(F) is a monotone map of R onto R. The scale a is the
    coupling's bounded log-scale; log s is clamped below at -7 as in Flow++. The inverse solves
    F(x) = sigmoid((z - b) e^{-a}) by bisection, bracketed exactly: logit F(x) lies between the
    components' logits (x - mu_k) / s_k, so x lies between min_k and max_k of mu_k + s_k (z - b) e^{-a}.
    A zero-initialised net gives a = b = mu = log s = 0 and equal weights: F = sigmoid, the identity.
    """

    LOG_S_MIN = -7.0
    MAX_ITER = 200  # bisection steps at most; float64 needs about 60 from the bracket

    def __init__(self, net: nn.Module, mask: Tensor, c_in: int, components: int):
        super().__init__(net, mask, c_in)
        self.components = components

    @staticmethod
    def net_channels(c_in: int, components: int) -> int:
        """The net's output channels: a, b and K (weight, mean, log-scale) triples per input channel."""
        return c_in * (2 + 3 * components)

    def _unpack(self, out: Tensor, x: Tensor) -> tuple[Tensor, ...]:
        b_, c, hh, ww = x.shape
        k = self.components
        out = out.view(b_, c, 2 + 3 * k, hh, ww)
        log_pi = torch.log_softmax(out[:, :, 2 : 2 + k], dim=2)
        mu, log_s = out[:, :, 2 + k : 2 + 2 * k], out[:, :, 2 + 2 * k :].clamp(min=self.LOG_S_MIN)
        return out[:, :, 0], out[:, :, 1], log_pi, mu, log_s

    def _map(self, x: Tensor, a: Tensor, b: Tensor, log_pi: Tensor, mu: Tensor, log_s: Tensor) -> tuple[Tensor, Tensor]:
        log_cdf, log_sf, log_pdf = _mixture_log_cdf_sf_pdf(x, log_pi, mu, log_s)
        return (log_cdf - log_sf) * torch.exp(a) + b, log_pdf - log_cdf - log_sf + a

    def _unmap(self, z: Tensor, a: Tensor, b: Tensor, log_pi: Tensor, mu: Tensor, log_s: Tensor) -> Tensor:
        target = ((z - b) * torch.exp(-a)).unsqueeze(2)
        ends = mu + torch.exp(log_s) * target
        lo, hi = ends.min(dim=2).values, ends.max(dim=2).values
        for _ in range(self.MAX_ITER):  # halve the bracket until it holds two adjacent floats
            mid = (lo + hi) / 2
            if bool(((mid == lo) | (mid == hi)).all()):
                break
            log_cdf, log_sf, _ = _mixture_log_cdf_sf_pdf(mid, log_pi, mu, log_s)
            above = log_cdf - log_sf > target.squeeze(2)
            lo, hi = torch.where(above, lo, mid), torch.where(above, mid, hi)
        return (lo + hi) / 2


class ActNorm(Flow):
    """Per-channel affine map with data-dependent initialisation (Glow, Kingma & Dhariwal 2018,
    https://arxiv.org/abs/1807.03039):

        z = (x + bias) * exp(log_scale),     ldj = H W sum_c log_scale_c.

    The first forward (or ``initialize``) sets bias = -mean and log_scale = -log std per channel over
    that batch, so its output has zero mean and unit variance per channel; the ``initialized`` buffer,
    saved with the weights, keeps a loaded model from initialising again.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        self.bias.copy_(-x.mean(dim=(0, 2, 3), keepdim=True))
        std = x.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
        self.log_scale.copy_(-torch.log(std + 1e-6))
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not self.initialized:
            self.initialize(x)
        ldj = x[0, 0].numel() * self.log_scale.sum()
        return (x + self.bias) * torch.exp(self.log_scale), ldj.expand(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        return z * torch.exp(-self.log_scale) - self.bias


class InvConv1x1(Flow):
    """Invertible 1x1 convolution, LU-parametrised (Glow, https://arxiv.org/abs/1807.03039):

        W = P L (U + diag(sign(s) exp(log|s|))),   z = W x per pixel,   ldj = H W sum log|s|,

    P a fixed permutation, L unit lower triangular, U strictly upper triangular, initialised from the
    LU decomposition of a random rotation (log-determinant 0)."""

    def __init__(self, channels: int):
        super().__init__()
        w = torch.linalg.qr(torch.randn(channels, channels))[0]
        p, lower, upper = torch.linalg.lu(w)
        s = torch.diagonal(upper)
        self.register_buffer("perm", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(s.abs()))

    def weight(self) -> Tensor:
        eye = torch.eye(len(self.log_s), dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.perm @ lower @ upper

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        c = x.shape[1]
        ldj = x[0, 0].numel() * self.log_s.sum()
        return F.conv2d(x, self.weight().view(c, c, 1, 1)), ldj.expand(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        c = z.shape[1]
        w_inv = torch.linalg.inv(self.weight().double()).to(z.dtype)  # float64: an exact-as-can-be inverse
        return F.conv2d(z, w_inv.view(c, c, 1, 1))
