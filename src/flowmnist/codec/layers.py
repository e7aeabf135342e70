"""The layer coders: one (encode, decode) pair per layer type in ``CODERS``, each a bijection between
(grid indices, ANS stream) pairs whose stream growth is the layer's log-determinant (the package's
docstring gives the steps); the dequantization's elementwise map and noise base, and the Gaussian
latents."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ..config import FlowmnistError
from ..flows import ActNorm, AffineCoupling, InvConv1x1, Split, Squeeze
from . import exact
from .ans import _Stream
from .intnet import fixed, image_condition

if TYPE_CHECKING:
    from .plan import Plan

H_RANGE = 64.0  # |h| bound of the dequantization noise before its sigmoid: u within e^-64 of a bin edge
MAX_SCALE = (1 << 23) - 1  # P < 2^24: constriction's uniform models need sizes below 2^24


def coupling_parts(layer: AffineCoupling) -> tuple[torch.nn.Module, Tensor, Tensor]:
    """What the codec reads of an affine coupling: (its net, its mask, its scale bound's log c), with
    s <- tanh(s / e^c) e^c (flows.AffineCoupling)."""
    return layer.net, layer.mask, layer.scale_factor


# ----------------------------------------------------------------------------------------------
# Affine coupling: local bits back in closed form (integer scale by uniform bits back)
# ----------------------------------------------------------------------------------------------


def _scale_shift(plan: Plan, layer: AffineCoupling, k: Tensor, bits: int, cond: Tensor | None) -> tuple:
    """The coupling's log-scale s (float64) and integer shift t' = t / 2^-bits on its free elements, and the
    free elements' mask, from the grid values (k + 1/2) 2^-bits of the kept ones; ``cond``: the image
    (uint8) for the dequantization's couplings.

    Format 2: the integer net on the kept values in units 2^-A, then s <- tanh(s / e^c) e^c in ``exact``'s
    maths and t' = t_int 2^(bits - A). Format 1: the float net in the model's dtype."""
    net, mask, log_c = coupling_parts(layer)
    free = (1 - mask).bool().expand_as(k)
    if plan.fmt >= 2:
        fac = exact.exp(log_c.detach().double().numpy()).reshape(1, -1, 1, 1)
        a = plan.spec.act_bits
        h = fixed(k, bits, a).clamp(-plan.spec.amax, plan.spec.amax) * mask.long()
        if cond is not None:
            h = torch.cat([h, image_condition(cond, a)], dim=1)
        s, t = plan.nets[id(layer)](h).chunk(2, dim=1)
        s = np.ldexp(s.double().numpy(), -a)
        s = (plan.m.tanh(s / fac) * fac)[free.numpy()]
        return s, t[free].numpy() << (bits - a), free
    v = ((k.to(torch.float64) + 0.5) * 2.0**-bits).to(plan.model_dtype)
    h = v * mask
    if cond is not None:
        h = torch.cat([h, _cond(cond, plan.model_dtype)], dim=1)
    s, t = net(h).chunk(2, dim=1)
    fac = log_c.exp().view(1, -1, 1, 1)
    s = torch.tanh(s / fac) * fac
    shift = np.rint(t[free].double().numpy() * 2.0**bits).astype(np.int64)
    return s[free].double().numpy(), shift, free


def _scales(s: np.ndarray, maths=exact) -> tuple[np.ndarray, np.ndarray]:
    """(P, q) with e^s ~ P / 2^q and P in [2^10, 2^11]: the scale to 11 bits, every uniform nearly exact."""
    q = np.clip(10 - np.floor(s / exact.LN2), 0, 40).astype(np.int64)
    p = np.clip(np.rint(maths.exp(s) * np.exp2(q)), 1, MAX_SCALE).astype(np.int64)
    return p, q


def scale_fwd(st: _Stream, k: np.ndarray, shift: np.ndarray, s: np.ndarray, maths=exact) -> np.ndarray:
    """Encoder: grid values of (x + t) e^s from x's indices ``k`` and t's integer ``shift``, elementwise:
    decode r ~ U{0..P-1}, encode (n mod Q) ~ U{0..Q-1}; costs -s nats per element."""
    p, q = _scales(s, maths)
    n = (k + shift) * p + st.pop_uniform(p, p.shape, exact=True)
    st.push_uniform(n & ((np.int64(1) << q) - 1), np.int64(1) << q)
    return n >> q


def scale_inv(st: _Stream, m: np.ndarray, shift: np.ndarray, s: np.ndarray, maths=exact) -> np.ndarray:
    """Decoder: the exact inverse of ``scale_fwd``."""
    p, q = _scales(s, maths)
    n = (m << q) + st.pop_uniform(np.int64(1) << q, s.shape)
    st.push_uniform(n % p, p, exact=True)
    return n // p - shift


def _coupling_fwd(st: _Stream, plan: Plan, layer, k: Tensor, bits: int, cond, ideal: np.ndarray) -> Tensor:
    """Encoder: z = (x + t) e^s on the free half (the kept half gives s and t), on the grid 2^-bits."""
    s, t, free = _scale_shift(plan, layer, k, bits, cond)
    out = k.clone()
    out[free] = torch.from_numpy(scale_fwd(st, k[free].numpy(), t, s, plan.m))
    ideal -= s.reshape(k.shape[0], -1).sum(1)
    return out


def _coupling_inv(st: _Stream, plan: Plan, layer, m: Tensor, bits: int, cond) -> Tensor:
    """Decoder: the exact inverse of ``_coupling_fwd`` (the kept half is unchanged, so s and t are too)."""
    s, t, free = _scale_shift(plan, layer, m, bits, cond)
    out = m.clone()
    out[free] = torch.from_numpy(scale_inv(st, m[free].numpy(), t, s, plan.m))
    return out


def _actnorm_terms(layer: ActNorm, shape: tuple[int, ...], delta: float) -> tuple[np.ndarray, np.ndarray]:
    """ActNorm's per-element (log-scale, integer shift) broadcast to ``shape``."""
    s = np.broadcast_to(layer.log_scale.detach().double().numpy(), shape).copy()
    t = np.broadcast_to(np.rint(layer.bias.detach().double().numpy() / delta).astype(np.int64), shape)
    return s, t


def _actnorm_fwd(
    layer: ActNorm, st: _Stream, k: np.ndarray, delta: float, ideal: np.ndarray, maths=exact
) -> np.ndarray:
    s, t = _actnorm_terms(layer, k.shape, delta)
    ideal -= s.reshape(k.shape[0], -1).sum(1)
    return scale_fwd(st, k, t, s, maths)


def _actnorm_inv(layer: ActNorm, st: _Stream, m: np.ndarray, delta: float, maths=exact) -> np.ndarray:
    s, t = _actnorm_terms(layer, m.shape, delta)
    return scale_inv(st, m, t, s, maths)


def _lu(layer: InvConv1x1) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """W = P L (U + diag(sign e^log_s)) in float64: (perm index, L strictly lower, U strictly upper, sign,
    log_s); z = W x puts channel perm[a] of L U' x in channel a."""
    mask = layer.lower_mask.double().numpy()
    lower = layer.lower.detach().double().numpy() * mask
    upper = layer.upper.detach().double().numpy() * mask.T
    perm = layer.perm.double().numpy().argmax(axis=1)
    return perm, lower, upper, layer.sign_s.double().numpy(), layer.log_s.detach().double().numpy()


def _lin(coef: np.ndarray, k: np.ndarray, channels, delta: float) -> np.ndarray:
    """sum_j coef_j v_j over ``channels`` of the grid values v = (k + 1/2) delta, in a fixed order."""
    acc = np.zeros(k.shape[:1] + k.shape[2:])
    for j in channels:
        acc = acc + coef[j] * ((k[:, j] + 0.5) * delta)
    return acc


def _invconv_fwd(
    layer: InvConv1x1, st: _Stream, k: np.ndarray, delta: float, ideal: np.ndarray, maths=exact
) -> np.ndarray:
    """Encoder: z = P L U' x by lifting on the grid (module docstring)."""
    perm, lower, upper, sign, log_s = _lu(layer)
    k, c = k.copy(), k.shape[1]
    for i in range(c):  # U': channels above i still hold x
        t = np.rint(_lin(upper[i], k, range(i + 1, c), delta) / (sign[i] * maths.exp(log_s[i])) / delta)
        s = np.full(t.shape, log_s[i])
        k[:, i] = scale_fwd(st, k[:, i], t.astype(np.int64), s, maths)
        if sign[i] < 0:
            k[:, i] = -k[:, i] - 1  # the grid's mirror: -(k + 1/2) = (-k - 1) + 1/2
    for i in reversed(range(c)):  # L: channels below i still hold U' x
        k[:, i] += np.rint(_lin(lower[i], k, range(i), delta) / delta).astype(np.int64)
    ideal -= k[0, 0].size * log_s.sum()
    return k[:, perm]


def _invconv_inv(layer: InvConv1x1, st: _Stream, m: np.ndarray, delta: float, maths=exact) -> np.ndarray:
    """Decoder: the exact inverse of ``_invconv_fwd``, its steps in reverse."""
    perm, lower, upper, sign, log_s = _lu(layer)
    k, c = np.empty_like(m), m.shape[1]
    k[:, perm] = m
    for i in range(c):
        k[:, i] -= np.rint(_lin(lower[i], k, range(i), delta) / delta).astype(np.int64)
    for i in reversed(range(c)):
        if sign[i] < 0:
            k[:, i] = -k[:, i] - 1
        t = np.rint(_lin(upper[i], k, range(i + 1, c), delta) / (sign[i] * maths.exp(log_s[i])) / delta)
        k[:, i] = scale_inv(st, k[:, i], t.astype(np.int64), np.full(t.shape, log_s[i]), maths)
    return k


# ----------------------------------------------------------------------------------------------
# The elementwise map g_x: noise y (h or u) -> logit space z0, by fine cells per coarse cell
# ----------------------------------------------------------------------------------------------


def _w_of_z(plan: Plan, z):
    """Pixel units w = x + u in [0, 256) of a logit-space value z = logit(a/2 + (1 - a) w / 256)."""
    return 256.0 * (plan.m.sigmoid(z) - plan.alpha / 2) / (1 - plan.alpha)


def _z_of_w(plan: Plan, w):
    return plan.m.logit(plan.alpha / 2 + (1 - plan.alpha) * np.asarray(w, np.float64) / 256.0)


def _u_of_y(plan: Plan, y):
    return plan.m.sigmoid(y) if plan.variational else y


def _y_of_u(plan: Plan, u):
    if not plan.variational:
        return np.clip(u, 0.0, 1.0)
    u = np.clip(u, 1e-300, 1.0)
    return np.clip(plan.m.log(u) - plan.m.log1p(-np.minimum(u, 1 - 1e-16)), -H_RANGE - 1, H_RANGE + 1)


def _pixel(plan: Plan, m):
    """The pixel value a logit-space cell m belongs to: floor of w at its centre (-1 or 256 outside)."""
    return np.clip(np.floor(_w_of_z(plan, (m + 0.5) * plan.dz)), -1, 256).astype(np.int64)


def _lower(plan: Plan, m, x):
    """First fine noise index of cell m for pixel x; the bottom of the range for x's lowest cell."""
    kmin, kmax = plan.y_range
    y = _y_of_u(plan, _w_of_z(plan, m * plan.dz) - x)
    lo = np.clip(np.ceil(y / plan.dy - 0.5), kmin, kmax + 1).astype(np.int64)
    return np.where(_pixel(plan, m - 1) != x, kmin, lo)


def _upper(plan: Plan, m, x):
    return np.where(_pixel(plan, m + 1) != x, plan.y_range[1] + 1, _lower(plan, m + 1, x))


def ymap_fwd(st: _Stream, plan: Plan, ky: np.ndarray, x: np.ndarray, ideal: np.ndarray) -> np.ndarray:
    """Encoder: noise index k -> logit-space cell m of pixel x; encode k's offset in the cell uniformly."""
    y = (ky + 0.5) * plan.dy
    w = x + _u_of_y(plan, y)
    m = np.floor(_z_of_w(plan, w) / plan.dz).astype(np.int64)
    for _ in range(64):  # a few corrections at most: the first guess is within a cell or two
        px = _pixel(plan, m)
        lo, hi = _lower(plan, m, x), _upper(plan, m, x)
        step = np.where(px < x, 1, np.where(px > x, -1, np.where(ky < lo, -1, np.where(ky >= hi, 1, 0))))
        if not step.any():
            break
        m = m + step
    else:
        raise FlowmnistError("codec: the noise-to-logit map did not converge (numerical trouble)")
    st.push_uniform(ky - lo, hi - lo)
    s = plan.alpha / 2 + (1 - plan.alpha) * w / 256.0
    log_dz = math.log((1 - plan.alpha) / 256.0) - plan.m.log(s) - plan.m.log1p(-s)
    ideal -= log_dz.reshape(len(ideal), -1).sum(1)
    if plan.variational:
        ideal -= plan.m.log_dsigmoid(y).reshape(len(ideal), -1).sum(1)
    return m


def ymap_inv(st: _Stream, plan: Plan, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decoder: logit-space cell m -> (pixel x, noise index k)."""
    x = _pixel(plan, m)
    if (x < 0).any() or (x > 255).any():
        raise ValueError("logit-space cell outside the pixel range")
    lo, hi = _lower(plan, m, x), _upper(plan, m, x)
    if (hi <= lo).any():
        raise ValueError("empty noise cell")
    return x, lo + st.pop_uniform(hi - lo, m.shape)


# ----------------------------------------------------------------------------------------------
# The base of the noise and the Gaussian latents
# ----------------------------------------------------------------------------------------------


def base_pop(st: _Stream, plan: Plan, shape: tuple[int, ...], ideal: np.ndarray) -> np.ndarray:
    """Encoder: decode the noise's base. Uniform dequantization: u on its grid. Variational: h0 from the
    logistic's coarse cell (categorical) and a uniform fine offset in it."""
    n = math.prod(shape)
    if not plan.variational:
        return st.pop_uniform(np.int64(plan.y_range[1] + 1), shape)
    c = st.pop_cat(n, st.categorical(plan.extra["base_probs"])) + plan.base_c0
    fine = plan.params.noise_bits - plan.params.base_bits
    k = (c << fine) + st.pop_uniform(np.int64(1 << fine), (n,))
    h0 = (k + 0.5) * plan.dy
    ideal += (plan.m.log_dsigmoid(h0) - math.log1p(-plan.noise_alpha)).reshape(len(ideal), -1).sum(1)
    return k.reshape(shape)


def base_push(st: _Stream, plan: Plan, k: np.ndarray) -> None:
    """Decoder: the inverse of ``base_pop``."""
    if not plan.variational:
        st.push_uniform(k, np.int64(plan.y_range[1] + 1))
        return
    fine = plan.params.noise_bits - plan.params.base_bits
    k = k.ravel()
    st.push_uniform(k & ((1 << fine) - 1), np.int64(1 << fine))
    c = (k >> fine) - plan.base_c0
    if (c < 0).any() or (c >= len(plan.extra["base_probs"])).any():
        raise ValueError("base noise outside its range")
    st.push_cat(c, st.categorical(plan.extra["base_probs"]))


def prior_push(st: _Stream, plan: Plan, k: np.ndarray, ideal: np.ndarray) -> None:
    """Encode latent grid indices under N(0, 1): the finer bits uniformly, the coarse cell by its Gaussian
    mass (constriction's QuantizedGaussian over cells of 2^-prior_bits)."""
    shift = plan.params.grid_bits - plan.params.prior_bits
    k = k.ravel()
    st.push_uniform(k & ((1 << shift) - 1), np.int64(1 << shift))
    scale = float(1 << plan.params.prior_bits)
    if plan.fmt >= 2:
        st.push_normal(k >> shift, 1 << plan.params.prior_bits)
    else:
        st.push_gauss(k >> shift, np.full(k.shape, -0.5), np.full(k.shape, scale))
    z = (k + 0.5) * plan.dz
    ideal += (0.5 * (z * z + math.log(2 * math.pi))).reshape(len(ideal), -1).sum(1)


def prior_pop(st: _Stream, plan: Plan, shape: tuple[int, ...]) -> np.ndarray:
    shift = plan.params.grid_bits - plan.params.prior_bits
    n = math.prod(shape)
    scale = float(1 << plan.params.prior_bits)
    if plan.fmt >= 2:
        hi = st.pop_normal(n, 1 << plan.params.prior_bits)
    else:
        hi = st.pop_gauss(np.full(n, -0.5), np.full(n, scale))
    return ((hi << shift) + st.pop_uniform(np.int64(1 << shift), (n,))).reshape(shape)


def _cond(x: Tensor, dtype) -> Tensor:
    return (x.to(dtype) / 255 * 2 - 1).contiguous()  # as Dequantization.noise conditions its couplings


@dataclass
class Site:
    """Where a layer is coded: on the grid 2^-bits, its nets conditioned on the image ``cond`` (the
    dequantization's couplings), each image's bound summed into ``ideal`` (the encoder's)."""

    bits: int
    cond: Tensor | None = None
    ideal: np.ndarray | None = None


# A layer coder: (stream, plan, layer, grid indices k, site) -> the layer's output indices; the decoder's
# is the exact inverse of the encoder's, values and stream alike.
Coder = Callable[[_Stream, "Plan", torch.nn.Module, Tensor, Site], Tensor]


def _coupling_enc(st: _Stream, plan: Plan, layer, k: Tensor, site: Site) -> Tensor:
    return _coupling_fwd(st, plan, layer, k, site.bits, site.cond, site.ideal)


def _coupling_dec(st: _Stream, plan: Plan, layer, k: Tensor, site: Site) -> Tensor:
    return _coupling_inv(st, plan, layer, k, site.bits, site.cond)


def _actnorm_enc(st: _Stream, plan: Plan, layer, k: Tensor, site: Site) -> Tensor:
    return torch.from_numpy(_actnorm_fwd(layer, st, k.numpy(), 2.0**-site.bits, site.ideal, plan.m))


def _actnorm_dec(st: _Stream, plan: Plan, layer, k: Tensor, site: Site) -> Tensor:
    return torch.from_numpy(_actnorm_inv(layer, st, k.numpy(), 2.0**-site.bits, plan.m))


def _invconv_enc(st: _Stream, plan: Plan, layer, k: Tensor, site: Site) -> Tensor:
    return torch.from_numpy(_invconv_fwd(layer, st, k.numpy(), 2.0**-site.bits, site.ideal, plan.m))


def _invconv_dec(st: _Stream, plan: Plan, layer, k: Tensor, site: Site) -> Tensor:
    return torch.from_numpy(_invconv_inv(layer, st, k.numpy(), 2.0**-site.bits, plan.m))


def _squeeze_enc(st: _Stream, plan: Plan, layer, k: Tensor, site: Site) -> Tensor:
    return layer(k)[0]


def _squeeze_dec(st: _Stream, plan: Plan, layer, k: Tensor, site: Site) -> Tensor:
    return layer.inverse(k)


def _split_enc(st: _Stream, plan: Plan, layer, k: Tensor, site: Site) -> Tensor:
    """The second half of the channels goes to the prior; the first half flows on."""
    kept, out = k.chunk(2, dim=1)
    prior_push(st, plan, out.contiguous().numpy(), site.ideal)
    return kept


def _split_dec(st: _Stream, plan: Plan, layer, k: Tensor, site: Site) -> Tensor:
    return torch.cat([k, torch.from_numpy(prior_pop(st, plan, tuple(k.shape)))], dim=1)


CODERS: dict[type, tuple[Coder, Coder]] = {
    AffineCoupling: (_coupling_enc, _coupling_dec),
    ActNorm: (_actnorm_enc, _actnorm_dec),
    InvConv1x1: (_invconv_enc, _invconv_dec),
    Squeeze: (_squeeze_enc, _squeeze_dec),
    Split: (_split_enc, _split_dec),
}
