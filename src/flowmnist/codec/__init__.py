"""Lossless compression of digits with a flow: bits-back coding on an ANS stack.

A file costs, per image, the model's single-sample bound  -log p(v) + log q(u | x)  (v = x + u, the
dequantized image) plus a fixed, amortised start-up cost, because every step below is a bijection
between (values, stream) pairs, coded with ``constriction``'s ANS stack (Bamler 2022, arXiv:2201.01741):

* **Dequantization by bits back** (Townsend et al. 2019, BB-ANS, arXiv:1901.04866; Ho et al. 2019,
  Flow++): the encoder *decodes* the noise from the stream under q(u | x), which gives -log q bits back,
  and the decoder, once it knows x, *encodes* the noise again. For a variational model q is itself a flow
  (base h0 ~ logistic, then affine couplings conditioned on x, then u = sigmoid(h)), coded by the same
  steps as the main flow.
* **Local bits-back coding through each affine coupling** (Ho, Lohn & Abbeel 2019, arXiv:1905.08500):
  the transformed half has a diagonal Jacobian, z = (x + t) e^s, so every element is coded in closed form.
  With x and z on one grid (index k, value (k + 1/2) delta), the shift is an integer t' = round(t/delta)
  and the scale a = e^s is coded with uniform bits back, in integer arithmetic (the modular scale
  transform of iFlow, Zhang et al. 2021, arXiv:2111.00965: local bits back with uniform noise):

      P = round(a Q):   decode r ~ U{0..P-1};   n = (k + t') P + r;   m = n div Q;   encode n mod Q ~ U{0..Q-1}

  which costs log Q - log P = -log a (the layer's log-determinant) and is undone exactly by the decoder.
* **Elementwise maps** (the dequantization's sigmoid, the shift by x, the logit) are one monotone map
  g_x: y -> z0 per pixel, from a fine noise grid to the main grid. The fine cells whose centres fall in a
  coarse cell m form an interval K(m); the encoder encodes its offset in K(m) uniformly (cost
  log |K(m)| = -log g' + log(delta_z / delta_y)), the decoder decodes it.
* **Actnorm and the invertible 1x1 convolution** (Glow) are linear: actnorm is the same elementwise step
  with a per-channel shift and scale; W = P L (U + diag(d)) of the 1x1 convolution is coded by lifting
  (the integer-to-integer factorisation of IDF++/iFlow): the upper factor channel by channel as
  z_i = sign(d_i) (x_i + sum_{j>i} U_ij x_j / d_i) |d_i| (one scale step each), the unit lower factor as
  integer shifts z_i = x_i + round(sum_{j<i} L_ij x_j / delta), the permutation exactly.
* **Squeeze and Split are free**; each split's half and the final latent are coded under their Gaussian
  on the grid 2^-prior_bits (the finer bits of the main grid uniformly).
* **A class-conditional model** (class Gaussians N(mu_y, sigma_y) on the final latent) codes the label by
  bits back: the encoder first decodes y from the stream under q(y | x), the model's own posterior at a
  fixed noise (``_label_posterior``), then codes z' = (z - mu_y) / sigma_y by a shift and a scale step
  and y under p(y); the decoder, once it knows x, encodes y again under q. A file then costs the marginal
  bound -log p(x) plus the small KL(q || p(y | x, u)).

Each layer type has one (encode, decode) pair in ``CODERS``; the ANS stack is ``ans``, the integer nets
``intnet``, the portable functions ``exact``, the file ``fileformat``.

The grids are parameters of the file (``CodecParams``). Encoder and decoder must compute bit-identical
numbers from the data, so format 2 computes nothing whose last bit depends on the machine:

* the coupling nets are integer networks (``intnet``: integer weights and activations in float64 tensors
  whose sums cannot round, tables for ELU and sigmoid), evaluated in any batch size and thread count;
* every elementwise function (the scale bound's tanh, e^s of the scales, the sigmoid and logit of the
  dequantization's map, the logistic base's cells) comes from ``exact``: exp and log built of IEEE-754's
  correctly rounded basic operations only, the same function on every machine;
* the Gaussians are one categorical table made by ``exact`` (``exact.gaussian_cells``), the initial bits
  a splitmix64 stream in integer arithmetic.

Format 1 (float nets in the model's dtype on one thread, numpy's and libm's functions, constriction's
QuantizedGaussian) is still read: such a file decodes where the CPU kind and PyTorch build compute its
nets alike, and is otherwise refused in one line that says so.

The file (``fileformat``): magic ``FMNZ``, format version, a header naming the model by the SHA-256 of
what the codec computes with (formats 2 and 3: the integer nets and the other coefficients,
``model_sha256``; format 1: the float weights), the ANS words, and a CRC-32 of everything before it.
Format 3 (format 2's numerics) splits the images into S runs of consecutive images, each coded on its own
ANS stack over its own initial bits, so that S worker processes encode and decode them side by side;
S depends on the image count alone (``default_streams``) unless the caller chooses it, and any number of
workers, one included, gives and reads the same file.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..config import MNIST_SHAPE, FlowmnistError
from ..flows import ActNorm, AffineCoupling, Dequantization, InvConv1x1, Logit, Sigmoid, Split, Squeeze
from . import exact
from .ans import PRIOR_RANGE as PRIOR_RANGE
from .ans import _NullStream, _seed, _Stream
from .fileformat import FORMAT_VERSION as FORMAT_VERSION
from .fileformat import CodecParams, Header, _read_header, chunk_sizes, idx_bytes, stream_sizes
from .fileformat import read_header as read_header
from .intnet import IntNet, IntSpec, fixed, image_condition, sha256_of

H_RANGE = 64.0  # |h| bound of the dequantization noise before its sigmoid: u within e^-64 of a bin edge
MAX_SCALE = (1 << 23) - 1  # P < 2^24: constriction's uniform models need sizes below 2^24
DEFAULT_STREAMS = 2  # streams of a large file unless told (``default_streams``): two cores' worth
STREAM_IMAGES = 1000  # a stream per this many images at least: its start-up bits stay below 2.6 %


# ----------------------------------------------------------------------------------------------
# The model as the codec sees it: its layers, checked once
# ----------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """What the codec needs of a model: the layer lists (each of a kind it can code) and the grids."""

    model: torch.nn.Module
    params: CodecParams
    noise: list[AffineCoupling]
    flows: list[torch.nn.Module]
    alpha: float  # the main logit's
    noise_alpha: float  # the noise logit's (the logistic base of q)
    variational: bool
    model_dtype: torch.dtype = torch.float32
    shape: tuple[int, int, int] = MNIST_SHAPE  # the model's image shape (_plan sets it)
    base_c0: int = 0
    extra: dict = field(default_factory=dict)
    fmt: int = FORMAT_VERSION
    nets: dict = field(default_factory=dict)  # id(coupling) -> its IntNet (format 2)

    @property
    def spec(self) -> IntSpec:
        return self.params.spec

    @property
    def m(self):
        """The elementwise maths: portable (format 2) or numpy's own (format 1)."""
        return exact if self.fmt >= 2 else _NumpyMath

    @property
    def dz(self) -> float:
        return 2.0**-self.params.grid_bits

    @property
    def dy(self) -> float:
        return 2.0 ** -(self.params.noise_bits + (9 if not self.variational else 0))

    @property
    def y_range(self) -> tuple[int, int]:
        """(k_min, k_max) of the fine noise grid: u in [0, 1), or h in [-H, H)."""
        if not self.variational:
            return 0, round(1 / self.dy) - 1
        return -round(H_RANGE / self.dy), round(H_RANGE / self.dy) - 1


def _refuse(what: str) -> FlowmnistError:
    return FlowmnistError(f"codec: {what} has no local bits-back coding; this model cannot be compressed")


def _plan(model: torch.nn.Module, params: CodecParams, fmt: int = FORMAT_VERSION) -> _Plan:
    """Check every layer of ``model`` against the kinds the codec codes; refuse the first other one.
    Format 2 builds each coupling's integer net."""
    dq = getattr(model, "dequant", None)
    if type(dq) is not Dequantization:
        raise _refuse(f"dequantization layer {type(dq).__name__}")
    for name in ("logit", "noise_logit"):
        if type(getattr(dq, name)) is not Logit:
            raise _refuse(f"dequant.{name} {type(getattr(dq, name)).__name__}")
    if type(dq.noise_sigmoid) is not Sigmoid:
        raise _refuse(f"dequant.noise_sigmoid {type(dq.noise_sigmoid).__name__}")
    for i, f in enumerate(dq.noise_flows):
        if type(f) is not AffineCoupling:
            raise _refuse(f"layer {type(f).__name__} (dequant.noise_flows[{i}])")
    for i, f in enumerate(model.flows):
        if type(f) not in CODERS:
            raise _refuse(f"layer {type(f).__name__} (flows[{i}])")
    prior = getattr(model, "prior", None)
    if not _standard_prior(prior) and not (fmt >= 2 and _top_class_prior(model)):
        raise _refuse(f"prior {type(prior).__name__}" + (" (class means beyond the final latent)" if fmt >= 2 else ""))
    shape = tuple(getattr(model, "image_shape", ()))
    if len(shape) != 3 or shape[0] != 1:
        raise FlowmnistError(f"codec: model image shape {shape or None}; the codec codes grayscale images (1, H, W)")
    dtype = next(model.parameters(), torch.empty(0)).dtype
    plan = _Plan(
        model,
        params,
        list(dq.noise_flows),
        list(model.flows),
        dq.logit.alpha,
        dq.noise_logit.alpha,
        dq.variational,
        dtype,
        shape=shape,
        fmt=fmt,
    )
    if fmt >= 2:
        for layer in plan.noise + [f for f in plan.flows if isinstance(f, AffineCoupling)]:
            try:
                plan.nets[id(layer)] = IntNet(_coupling_parts(layer)[0], plan.spec)
            except ValueError as e:
                raise FlowmnistError(f"codec: a coupling net has no exact integer form ({e})") from e
    if plan.variational:
        _base_model(plan)
    return plan


def _coupling_parts(layer: AffineCoupling) -> tuple[torch.nn.Module, Tensor, Tensor]:
    """What the codec reads of an affine coupling: (its net, its mask, its scale bound's log c), with
    s <- tanh(s / e^c) e^c (flows.AffineCoupling)."""
    return layer.net, layer.mask, layer.scale_factor


def model_sha256(plan: _Plan) -> str:
    """A format-2 file's model: SHA-256 of the integer nets' weights and every other number the codec
    computes with (coupling scale bounds, actnorm, 1x1 convolutions, logit squeezes, the numerics)."""
    arrays = []
    for layer in plan.noise + plan.flows:
        if isinstance(layer, AffineCoupling):
            arrays += plan.nets[id(layer)].arrays() + [_bits(_coupling_parts(layer)[2])]
        elif isinstance(layer, (ActNorm, InvConv1x1)):
            arrays += [_bits(p) for p in layer.state_dict().values()]
    arrays.append(_bits(torch.tensor([plan.alpha, plan.noise_alpha], dtype=torch.float64)))
    if _conditional(plan):
        arrays += [_bits(t) for t in plan.model.prior.state_dict().values()]
    return sha256_of(arrays, plan.spec.tag())


def _bits(t: Tensor) -> np.ndarray:
    """A float tensor's float64 values as their bit patterns (int64), for hashing."""
    return t.detach().cpu().double().contiguous().numpy().view(np.int64)


def _standard_prior(prior) -> bool:
    """N(0, I) on the whole latent: no prior object, or the models' standard-normal one."""
    from .. import models

    standard = getattr(models, "StandardNormalPrior", None)
    return prior is None or (standard is not None and type(prior) is standard)


def _top_class_prior(model) -> bool:
    """A ``ClassPrior`` whose class Gaussians sit on the final latent alone (class means on "top"): the
    split halves stay N(0, I), and the final latent is coded under N(mu_y, sigma_y) by an affine step."""
    from .. import models

    prior = model.prior
    if type(prior) is not getattr(models, "ClassPrior", None):
        return False
    shape = tuple(model.image_shape)
    for layer in model.flows:
        shape = layer.out_shape(shape)
    return prior.class_dims == math.prod(shape)


def _conditional(plan: _Plan) -> bool:
    return not _standard_prior(getattr(plan.model, "prior", None))


def _base_model(plan: _Plan) -> None:
    """The categorical over coarse cells of the logistic base h0 = logit(a/2 + (1 - a) u0), u0 ~ U[0, 1):
    P(cell c) = F(hi_c) - F(lo_c), F(h) = (sigmoid(h) - a/2) / (1 - a); each cell then uniform."""
    a, w = plan.noise_alpha, 2.0**-plan.params.base_bits
    lo, hi = float(plan.m.logit(a / 2)), float(plan.m.logit(1 - a / 2))
    c0, c1 = math.floor(lo / w), math.floor(hi / w)
    edges = np.clip(np.arange(c0, c1 + 2) * w, lo, hi)
    cdf = (plan.m.sigmoid(edges) - a / 2) / (1 - a)
    plan.base_c0 = c0
    plan.extra["base_probs"] = np.diff(cdf)


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over the model's state_dict: each name and the tensor's raw bytes, in order."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def numerics_tag(model: torch.nn.Module) -> str:
    """What the nets' float results depend on besides the weights: dtype, code path, torch build."""
    fast = any(getattr(m, "fast", False) for m in model.modules())
    ref = next(model.parameters(), torch.empty(0))
    return f"{str(ref.dtype).removeprefix('torch.')} fast={int(fast)} torch={torch.__version__}"


@contextlib.contextmanager
def _nets_threads(fmt: int) -> Iterator[None]:
    """Format 1's float nets run on one thread (the same kernels, whatever the caller set); format 2's
    integer nets give the same integers on any number."""
    old = torch.get_num_threads()
    torch.set_num_threads(1 if fmt < 2 else old)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.set_num_threads(old)


# ----------------------------------------------------------------------------------------------
# Format 1's elementwise maths: numpy's functions (their last bits depend on the CPU kind)
# ----------------------------------------------------------------------------------------------


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))


def _logit(p):
    p = np.asarray(p, np.float64)
    return np.log(p) - np.log1p(-p)


def _log_dsigmoid(h):
    """log sigmoid'(h) = -softplus(h) - softplus(-h)."""
    h = np.asarray(h, np.float64)
    return -(np.logaddexp(0, h) + np.logaddexp(0, -h))


class _NumpyMath:
    """Format 1's maths, with the names of ``exact``'s."""

    exp = staticmethod(np.exp)
    log = staticmethod(np.log)
    log1p = staticmethod(np.log1p)
    sigmoid = staticmethod(_sigmoid)
    logit = staticmethod(_logit)
    log_dsigmoid = staticmethod(_log_dsigmoid)


# ----------------------------------------------------------------------------------------------
# Affine coupling: local bits back in closed form (integer scale by uniform bits back)
# ----------------------------------------------------------------------------------------------


def _scale_shift(plan: _Plan, layer: AffineCoupling, k: Tensor, bits: int, cond: Tensor | None) -> tuple:
    """The coupling's log-scale s (float64) and integer shift t' = t / 2^-bits on its free elements, and the
    free elements' mask, from the grid values (k + 1/2) 2^-bits of the kept ones; ``cond``: the image
    (uint8) for the dequantization's couplings.

    Format 2: the integer net on the kept values in units 2^-A, then s <- tanh(s / e^c) e^c in ``exact``'s
    maths and t' = t_int 2^(bits - A). Format 1: the float net in the model's dtype."""
    net, mask, log_c = _coupling_parts(layer)
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


def _scale_fwd(st: _Stream, k: np.ndarray, shift: np.ndarray, s: np.ndarray, maths=exact) -> np.ndarray:
    """Encoder: grid values of (x + t) e^s from x's indices ``k`` and t's integer ``shift``, elementwise:
    decode r ~ U{0..P-1}, encode (n mod Q) ~ U{0..Q-1}; costs -s nats per element."""
    p, q = _scales(s, maths)
    n = (k + shift) * p + st.pop_uniform(p, p.shape, exact=True)
    st.push_uniform(n & ((np.int64(1) << q) - 1), np.int64(1) << q)
    return n >> q


def _scale_inv(st: _Stream, m: np.ndarray, shift: np.ndarray, s: np.ndarray, maths=exact) -> np.ndarray:
    """Decoder: the exact inverse of ``_scale_fwd``."""
    p, q = _scales(s, maths)
    n = (m << q) + st.pop_uniform(np.int64(1) << q, s.shape)
    st.push_uniform(n % p, p, exact=True)
    return n // p - shift


def _coupling_fwd(st: _Stream, plan: _Plan, layer, k: Tensor, bits: int, cond, ideal: np.ndarray) -> Tensor:
    """Encoder: z = (x + t) e^s on the free half (the kept half gives s and t), on the grid 2^-bits."""
    s, t, free = _scale_shift(plan, layer, k, bits, cond)
    out = k.clone()
    out[free] = torch.from_numpy(_scale_fwd(st, k[free].numpy(), t, s, plan.m))
    ideal -= s.reshape(k.shape[0], -1).sum(1)
    return out


def _coupling_inv(st: _Stream, plan: _Plan, layer, m: Tensor, bits: int, cond) -> Tensor:
    """Decoder: the exact inverse of ``_coupling_fwd`` (the kept half is unchanged, so s and t are too)."""
    s, t, free = _scale_shift(plan, layer, m, bits, cond)
    out = m.clone()
    out[free] = torch.from_numpy(_scale_inv(st, m[free].numpy(), t, s, plan.m))
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
    return _scale_fwd(st, k, t, s, maths)


def _actnorm_inv(layer: ActNorm, st: _Stream, m: np.ndarray, delta: float, maths=exact) -> np.ndarray:
    s, t = _actnorm_terms(layer, m.shape, delta)
    return _scale_inv(st, m, t, s, maths)


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
        k[:, i] = _scale_fwd(st, k[:, i], t.astype(np.int64), s, maths)
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
        k[:, i] = _scale_inv(st, k[:, i], t.astype(np.int64), np.full(t.shape, log_s[i]), maths)
    return k


# ----------------------------------------------------------------------------------------------
# The elementwise map g_x: noise y (h or u) -> logit space z0, by fine cells per coarse cell
# ----------------------------------------------------------------------------------------------


def _w_of_z(plan: _Plan, z):
    """Pixel units w = x + u in [0, 256) of a logit-space value z = logit(a/2 + (1 - a) w / 256)."""
    return 256.0 * (plan.m.sigmoid(z) - plan.alpha / 2) / (1 - plan.alpha)


def _z_of_w(plan: _Plan, w):
    return plan.m.logit(plan.alpha / 2 + (1 - plan.alpha) * np.asarray(w, np.float64) / 256.0)


def _u_of_y(plan: _Plan, y):
    return plan.m.sigmoid(y) if plan.variational else y


def _y_of_u(plan: _Plan, u):
    if not plan.variational:
        return np.clip(u, 0.0, 1.0)
    u = np.clip(u, 1e-300, 1.0)
    return np.clip(plan.m.log(u) - plan.m.log1p(-np.minimum(u, 1 - 1e-16)), -H_RANGE - 1, H_RANGE + 1)


def _pixel(plan: _Plan, m):
    """The pixel value a logit-space cell m belongs to: floor of w at its centre (-1 or 256 outside)."""
    return np.clip(np.floor(_w_of_z(plan, (m + 0.5) * plan.dz)), -1, 256).astype(np.int64)


def _lower(plan: _Plan, m, x):
    """First fine noise index of cell m for pixel x; the bottom of the range for x's lowest cell."""
    kmin, kmax = plan.y_range
    y = _y_of_u(plan, _w_of_z(plan, m * plan.dz) - x)
    lo = np.clip(np.ceil(y / plan.dy - 0.5), kmin, kmax + 1).astype(np.int64)
    return np.where(_pixel(plan, m - 1) != x, kmin, lo)


def _upper(plan: _Plan, m, x):
    return np.where(_pixel(plan, m + 1) != x, plan.y_range[1] + 1, _lower(plan, m + 1, x))


def _ymap_fwd(st: _Stream, plan: _Plan, ky: np.ndarray, x: np.ndarray, ideal: np.ndarray) -> np.ndarray:
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


def _ymap_inv(st: _Stream, plan: _Plan, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def _base_pop(st: _Stream, plan: _Plan, shape: tuple[int, ...], ideal: np.ndarray) -> np.ndarray:
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


def _base_push(st: _Stream, plan: _Plan, k: np.ndarray) -> None:
    """Decoder: the inverse of ``_base_pop``."""
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


def _prior_push(st: _Stream, plan: _Plan, k: np.ndarray, ideal: np.ndarray) -> None:
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


def _prior_pop(st: _Stream, plan: _Plan, shape: tuple[int, ...]) -> np.ndarray:
    shift = plan.params.grid_bits - plan.params.prior_bits
    n = math.prod(shape)
    scale = float(1 << plan.params.prior_bits)
    if plan.fmt >= 2:
        hi = st.pop_normal(n, 1 << plan.params.prior_bits)
    else:
        hi = st.pop_gauss(np.full(n, -0.5), np.full(n, scale))
    return ((hi << shift) + st.pop_uniform(np.int64(1 << shift), (n,))).reshape(shape)


# ----------------------------------------------------------------------------------------------
# One chunk of images, both ways
# ----------------------------------------------------------------------------------------------


def _cond(x: Tensor, dtype) -> Tensor:
    return (x.to(dtype) / 255 * 2 - 1).contiguous()  # as Dequantization.noise conditions its couplings


@dataclass
class _Site:
    """Where a layer is coded: on the grid 2^-bits, its nets conditioned on the image ``cond`` (the
    dequantization's couplings), each image's bound summed into ``ideal`` (the encoder's)."""

    bits: int
    cond: Tensor | None = None
    ideal: np.ndarray | None = None


# A layer coder: (stream, plan, layer, grid indices k, site) -> the layer's output indices; the decoder's
# is the exact inverse of the encoder's, values and stream alike.
Coder = Callable[["_Stream", _Plan, torch.nn.Module, Tensor, _Site], Tensor]


def _coupling_enc(st: _Stream, plan: _Plan, layer, k: Tensor, site: _Site) -> Tensor:
    return _coupling_fwd(st, plan, layer, k, site.bits, site.cond, site.ideal)


def _coupling_dec(st: _Stream, plan: _Plan, layer, k: Tensor, site: _Site) -> Tensor:
    return _coupling_inv(st, plan, layer, k, site.bits, site.cond)


def _actnorm_enc(st: _Stream, plan: _Plan, layer, k: Tensor, site: _Site) -> Tensor:
    return torch.from_numpy(_actnorm_fwd(layer, st, k.numpy(), 2.0**-site.bits, site.ideal, plan.m))


def _actnorm_dec(st: _Stream, plan: _Plan, layer, k: Tensor, site: _Site) -> Tensor:
    return torch.from_numpy(_actnorm_inv(layer, st, k.numpy(), 2.0**-site.bits, plan.m))


def _invconv_enc(st: _Stream, plan: _Plan, layer, k: Tensor, site: _Site) -> Tensor:
    return torch.from_numpy(_invconv_fwd(layer, st, k.numpy(), 2.0**-site.bits, site.ideal, plan.m))


def _invconv_dec(st: _Stream, plan: _Plan, layer, k: Tensor, site: _Site) -> Tensor:
    return torch.from_numpy(_invconv_inv(layer, st, k.numpy(), 2.0**-site.bits, plan.m))


def _squeeze_enc(st: _Stream, plan: _Plan, layer, k: Tensor, site: _Site) -> Tensor:
    return layer(k)[0]


def _squeeze_dec(st: _Stream, plan: _Plan, layer, k: Tensor, site: _Site) -> Tensor:
    return layer.inverse(k)


def _split_enc(st: _Stream, plan: _Plan, layer, k: Tensor, site: _Site) -> Tensor:
    """The second half of the channels goes to the prior; the first half flows on."""
    kept, out = k.chunk(2, dim=1)
    _prior_push(st, plan, out.contiguous().numpy(), site.ideal)
    return kept


def _split_dec(st: _Stream, plan: _Plan, layer, k: Tensor, site: _Site) -> Tensor:
    return torch.cat([k, torch.from_numpy(_prior_pop(st, plan, tuple(k.shape)))], dim=1)


CODERS: dict[type, tuple[Coder, Coder]] = {
    AffineCoupling: (_coupling_enc, _coupling_dec),
    ActNorm: (_actnorm_enc, _actnorm_dec),
    InvConv1x1: (_invconv_enc, _invconv_dec),
    Squeeze: (_squeeze_enc, _squeeze_dec),
    Split: (_split_enc, _split_dec),
}


def _encode_chunk(st: _Stream, plan: _Plan, x: Tensor) -> np.ndarray:
    """Encode images x (B, 1, H, W) uint8; returns each one's single-sample bound in nats at the noise
    the codec drew (the cost the codec realises, up to its grids)."""
    ideal = np.zeros(x.shape[0])
    y = None
    if _conditional(plan):  # bits back on the label: decode y from the stream under q(y | x)
        q = _label_posterior(plan, x)
        y = st.pop_rows(q)
        ideal += np.log(q[np.arange(len(y)), y] / q.sum(1))
    ky = torch.from_numpy(_base_pop(st, plan, tuple(x.shape), ideal))
    noise = _Site(plan.params.noise_bits, x, ideal)
    for layer in plan.noise:
        ky = CODERS[type(layer)][0](st, plan, layer, ky, noise)
    kmin, kmax = plan.y_range
    if (ky < kmin).any() or (ky > kmax).any():
        raise FlowmnistError(f"codec: dequantization noise outside the codec's range (|h| > {H_RANGE:g})")
    k = torch.from_numpy(_ymap_fwd(st, plan, ky.numpy(), x.numpy().astype(np.int64), ideal))
    main = _Site(plan.params.grid_bits, None, ideal)
    for layer in plan.flows:
        k = CODERS[type(layer)][0](st, plan, layer, k, main)
    _final_push(st, plan, k.contiguous().numpy(), y, ideal)
    return ideal


# ----------------------------------------------------------------------------------------------
# The final latent, and a class-conditional model's label
# ----------------------------------------------------------------------------------------------


def _final_push(st: _Stream, plan: _Plan, k: np.ndarray, y: np.ndarray | None, ideal: np.ndarray) -> None:
    """The final latent under the prior; for a class-conditional model under N(mu_y, sigma_y), as
    z' = (z - mu_y) / sigma_y by a shift and a scale step (cost log sigma_y), and then the label y under
    p(y)."""
    if y is None:
        _prior_push(st, plan, k, ideal)
        return
    s, t = _class_terms(plan, y, k.shape)
    ideal -= s.reshape(len(y), -1).sum(1)
    _prior_push(st, plan, _scale_fwd(st, k, t, s, plan.m), ideal)
    probs, log_py = _label_model(plan)
    st.push_cat(y, st.categorical(probs))
    ideal -= log_py[y]


def _final_pop(st: _Stream, plan: _Plan, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray | None]:
    """The inverse of ``_final_push``: (final latent, label or None)."""
    if not _conditional(plan):
        return _prior_pop(st, plan, shape), None
    y = st.pop_cat(shape[0], st.categorical(_label_model(plan)[0]))
    s, t = _class_terms(plan, y, shape)
    return _scale_inv(st, _prior_pop(st, plan, shape), t, s, plan.m), y


def _label_posterior(plan: _Plan, x: Tensor) -> np.ndarray:
    """q(y | x) (B, classes), unnormalised: p(z | y) p(y) at the latent z of images x with the noise at its
    centre and every scale step's remainder 0 (the layer coders on a ``_NullStream``), in ``exact``'s
    maths with sums in a fixed order: the same numbers for the encoder, which decodes y under it (bits
    back), and the decoder, which encodes y again once it knows x."""
    null, ideal = _NullStream(), np.zeros(len(x))
    centre = 0 if plan.variational else (plan.y_range[1] + 1) // 2
    ky = torch.full(tuple(x.shape), centre, dtype=torch.int64)
    noise = _Site(plan.params.noise_bits, x, ideal)
    for layer in plan.noise:
        ky = CODERS[type(layer)][0](null, plan, layer, ky, noise)
    k = torch.from_numpy(_ymap_fwd(null, plan, ky.numpy(), x.numpy().astype(np.int64), ideal))
    main = _Site(plan.params.grid_bits, None, ideal)
    for layer in plan.flows:
        k = CODERS[type(layer)][0](null, plan, layer, k, main)
    z = (k.reshape(len(x), -1).numpy() + 0.5) * plan.dz
    prior = plan.model.prior
    mean, log_scale = prior.mean.detach().double().numpy(), prior.log_scale.detach().double().numpy()
    ll = (
        np.stack(
            [
                np.cumsum(-0.5 * np.square((z - mean[c]) * exact.exp(-log_scale[c])) - log_scale[c], axis=1)[:, -1]
                for c in range(len(mean))
            ],
            axis=1,
        )
        + _label_model(plan)[1]
    )
    return exact.exp(ll - ll.max(axis=1, keepdims=True))


def _class_terms(plan: _Plan, y: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per element of the final latent: the scale step's log-scale -log sigma_y and the integer shift
    -mu_y / delta (the codec's z' = (z + t) e^s)."""
    prior = plan.model.prior
    mean = prior.mean.detach().double().numpy()[y]
    log_scale = prior.log_scale.detach().double().numpy()[y]
    return (-log_scale).reshape(shape), np.rint(-mean / plan.dz).astype(np.int64).reshape(shape)


def _label_model(plan: _Plan) -> tuple[np.ndarray, np.ndarray]:
    """p(y) as the probabilities the coder quantises (``exact.exp`` of log p(y)), and log p(y)."""
    log_py = plan.model.prior.log_py.detach().double().numpy()
    return exact.exp(log_py), log_py


def _final_shape(plan: _Plan, b: int) -> tuple[int, ...]:
    shape = plan.shape
    for layer in plan.flows:
        shape = layer.out_shape(shape)
    return (b, *shape)


def _decode_chunk(st: _Stream, plan: _Plan, b: int) -> Tensor:
    """The exact inverse of ``_encode_chunk``: b images as uint8 (b, 1, H, W)."""
    k, y = _final_pop(st, plan, _final_shape(plan, b))
    k = torch.from_numpy(k)
    main = _Site(plan.params.grid_bits)
    for layer in reversed(plan.flows):
        k = CODERS[type(layer)][1](st, plan, layer, k, main)
    x, ky = _ymap_inv(st, plan, k.numpy())
    xt = torch.from_numpy(x.astype(np.uint8))
    ky = torch.from_numpy(ky)
    noise = _Site(plan.params.noise_bits, xt)
    for layer in reversed(plan.noise):
        ky = CODERS[type(layer)][1](st, plan, layer, ky, noise)
    _base_push(st, plan, ky.numpy())
    if y is not None:
        st.push_rows(y, _label_posterior(plan, xt))
    return xt


# ----------------------------------------------------------------------------------------------
# The file
# ----------------------------------------------------------------------------------------------


def _as_images(images, shape: tuple[int, ...]) -> np.ndarray:
    """uint8 (N, H, W) of the model's ``shape`` (1, H, W), else one line naming both shapes."""
    arr = np.asarray(images.numpy() if isinstance(images, Tensor) else images)
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 3 or arr.shape[1:] != tuple(shape[1:]):
        h, w = shape[1:]
        raise FlowmnistError(f"codec: expected N x {h} x {w} images (the model's size), got shape {tuple(arr.shape)}")
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255 or (arr != np.round(arr)).any()):
            raise FlowmnistError("codec: pixels must be integers 0..255")
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr)


@dataclass
class Stats:
    """What ``compress_images`` measured: file bytes, the single-sample bound at the codec's own noise
    (bits, summed over images) and the initial bits the file carries."""

    images: int
    file_bytes: int
    bound_bits: float
    initial_bits: int
    dims: int  # pixels per image (the model's H x W)

    @property
    def rate_bpd(self) -> float:
        return 8 * self.file_bytes / max(1, self.images * self.dims)

    @property
    def bound_bpd(self) -> float:
        return self.bound_bits / max(1, self.images * self.dims)


def default_streams(n: int) -> int:
    """The streams a file of n images is written in unless told: one per ``STREAM_IMAGES`` images, at most
    ``DEFAULT_STREAMS``. It depends on n alone, so the same images give the same file on every machine;
    each stream costs its own start-up bits (``seed_words`` words, about 22 kbit), 0.003 bits/dim over
    10,000 digits."""
    return max(1, min(DEFAULT_STREAMS, n // STREAM_IMAGES))


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity), the default number of workers."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform
        return os.cpu_count() or 1


def compress_images(
    model: torch.nn.Module,
    images,
    *,
    name: str = "",
    params: CodecParams | None = None,
    original: bytes | None = None,
    source: str = "idx",
    progress: Callable[[int], None] | None = None,
    version: int = FORMAT_VERSION,
    streams: int | None = None,
    workers: int | None = None,
) -> tuple[bytes, Stats]:
    """Compress uint8 images (N, H, W) or (N, 1, H, W) of the model's size; ``original``: the bytes
    decompression restores (an IDX file of exactly these pixels; default the IDX file of the images);
    ``streams``: independent streams of consecutive images (default ``default_streams(N)``; formats 1 and
    2 hold one), coded by up to ``workers`` processes side by side (default 1: in this process; the file
    is the same for any number; more than one needs the caller's script guarded by
    ``if __name__ == "__main__"``, as ``multiprocessing`` spawns it); ``version`` 1 or 2 writes an older
    format (for tests and measurements). Returns (file, stats)."""
    params = params or CodecParams()
    params.check()
    plan = _plan(model, params, version)
    arr = _as_images(images, plan.shape)
    original = idx_bytes(arr) if original is None else original
    n_streams = streams if streams is not None else default_streams(len(arr)) if version >= 3 else 1
    if not 1 <= n_streams <= max(1, len(arr)) or (n_streams > 1 and version < 3):
        raise FlowmnistError(
            f"codec: {n_streams} streams for {len(arr)} images (1 to {max(1, len(arr))}; format {version} holds one)"
        )
    sizes = stream_sizes(len(arr), n_streams)
    starts = np.cumsum([0] + sizes)
    jobs = [(arr[a:b], int(a)) for a, b in zip(starts[:-1], starts[1:], strict=True)]
    coded = _map_streams(_encode_stream, plan, jobs, workers, progress)
    seed = _seed(params.seed_words, version)
    parts, tails = [], []
    for size, (words, _) in zip(sizes, coded, strict=True):
        kept = _common_prefix(words, seed)
        parts.append((size, kept, len(words) - kept))
        tails.append(words[kept:])
    v1 = version < 2
    header = Header(
        name,
        weights_sha256(model) if v1 else model_sha256(plan),
        numerics_tag(model) if v1 else plan.spec.tag(),
        params,
        len(arr),
        original[: len(original) - arr.size],
        zlib.crc32(original),
        source,
        sum(p[1] for p in parts),
        sum(p[2] for p in parts),
        version,
        plan.shape,
        tuple(parts) if version >= 3 else (),
    )
    body = header.pack() + np.concatenate(tails).astype("<u4").tobytes()
    data = body + struct.pack("<I", zlib.crc32(body))
    bound = sum(b for _, b in coded)
    initial = sum(32 * (params.seed_words - p[1]) for p in parts)
    return data, Stats(len(arr), len(data), bound, initial, math.prod(plan.shape))


def _encode_stream(plan: _Plan, arr: np.ndarray, first: int, progress) -> tuple[np.ndarray, float]:
    """One stream: images ``arr`` (numbered from ``first`` in messages) on a fresh stack over the initial
    bits; returns its words and the images' summed bound in bits."""
    params = plan.params
    st = _Stream(_seed(params.seed_words, plan.fmt))
    bound, start = 0.0, 0
    with _nets_threads(plan.fmt):
        for b in chunk_sizes(len(arr), params.batch, params.ramp):
            x = torch.from_numpy(arr[start : start + b].copy()).unsqueeze(1)
            try:
                bound += float(_encode_chunk(st, plan, x).sum()) / math.log(2)
            except ValueError as e:
                lo = first + start
                raise FlowmnistError(f"codec: cannot encode images {lo}..{lo + b - 1} ({e})") from e
            start += b
            if progress:
                progress(b)
    return st.words(), bound


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.nonzero(a[:n] != b[:n])[0]
    return int(diff[0]) if len(diff) else n


def decompress_bytes(
    data: bytes,
    model: torch.nn.Module,
    *,
    name: str = "<bytes>",
    progress: Callable[[int], None] | None = None,
    workers: int | None = None,
) -> tuple[bytes, Header]:
    """The original bytes (an IDX file) of a compressed file, and its header; every check names ``name``.
    A file of S streams is decoded by up to ``workers`` processes (default 1: in this process)."""
    header, offset = _read_header(data, name)
    plan = _plan(model, header.params, header.version)
    if header.shape != plan.shape:
        h, w = header.shape[1:]
        raise FlowmnistError(
            f"{name}: holds images of {w}x{h} pixels, the model given codes {plan.shape[2]}x{plan.shape[1]}"
        )
    sha = model_sha256(plan) if header.version >= 2 else weights_sha256(model)
    if sha != header.weights_sha256:
        raise FlowmnistError(
            f"{name}: made with model {header.model_name or '?'} (weights {header.weights_sha256[:12]}), "
            f"not the one given (weights {sha[:12]})"
        )
    seed = _seed(header.params.seed_words, header.version)
    jobs = []
    for count, kept, n_words in header.parts():
        tail = np.frombuffer(data, "<u4", n_words, offset).astype(np.uint32)
        jobs.append((count, np.concatenate([seed[:kept], tail]), name, header))
        offset += 4 * n_words
    pixels = _map_streams(_decode_stream, plan, jobs, workers, progress)
    original = header.idx_header + np.concatenate([np.zeros((0, *plan.shape[1:]), np.uint8), *pixels]).tobytes()
    if zlib.crc32(original) != header.crc32:
        raise _undecodable(name, header, model)
    return original, header


def _decode_stream(plan: _Plan, count: int, words: np.ndarray, name: str, header: Header, progress) -> np.ndarray:
    """One stream's ``count`` images, last chunk first; the stack must end as the initial bits."""
    st = _Stream(words)
    sizes = chunk_sizes(count, header.params.batch, header.params.ramp)
    out = np.zeros((count, *plan.shape[1:]), np.uint8)
    end = count
    with _nets_threads(plan.fmt):
        for b in reversed(sizes):
            try:
                out[end - b : end] = _decode_chunk(st, plan, b)[:, 0].numpy()
            except (ValueError, OverflowError, RuntimeError, IndexError) as e:
                raise _undecodable(name, header, plan.model, e) from e
            end -= b
            if progress:
                progress(b)
    if not np.array_equal(st.words(), _seed(header.params.seed_words, header.version)):
        raise _undecodable(name, header, plan.model)
    return out


# ----------------------------------------------------------------------------------------------
# Streams side by side: worker processes
# ----------------------------------------------------------------------------------------------

_WORKER: dict = {}  # in a worker process: its plan, built once, and the queue its progress goes to


def _map_streams(fn: Callable, plan: _Plan, jobs: list[tuple], workers: int | None, progress) -> list:
    """``fn(plan, *job, progress)`` for every job, in order: here, one after another, where one worker is
    allowed or there is one job; else in min(workers, jobs) processes (spawned: a forked OpenMP runtime
    may hang), each with its share of the cores as torch threads. Processes, not threads: the stream
    coders spend much of their time in Python and in calls that hold the GIL."""
    n = min(len(jobs), max(1, workers or 1))
    if n <= 1:
        return [fn(plan, *job, progress) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    threads = max(1, usable_cores() // n)
    init = (plan.model, plan.params, plan.fmt, threads, queue)
    with ProcessPoolExecutor(n, mp_context=ctx, initializer=_worker_init, initargs=init) as pool:
        futures = [pool.submit(_worker_run, fn, job) for job in jobs]
        pending = set(futures)
        while pending:
            pending = wait(pending, timeout=0.2)[1]
            _drain(queue, progress, 0.0 if pending else 0.1)
        try:
            return [f.result() for f in futures]
        except BrokenProcessPool as e:
            raise FlowmnistError(f"codec: a worker process ended abruptly ({e}); try --workers 1") from e


def _drain(queue, progress, timeout: float) -> None:
    """Pass the workers' progress reports on; ``timeout``: how long to wait for late ones."""
    import queue as queues

    while True:
        try:
            done = queue.get(timeout=timeout) if timeout else queue.get_nowait()
        except queues.Empty:
            return
        if progress:
            progress(done)


def _worker_init(model, params, fmt, threads, queue) -> None:
    torch.set_num_threads(threads)
    _WORKER.update(plan=_plan(model, params, fmt), queue=queue)


def _worker_run(fn: Callable, job: tuple):
    return fn(_WORKER["plan"], *job, _WORKER["queue"].put)


def _undecodable(name: str, header: Header, model, err: Exception | None = None) -> FlowmnistError:
    """The file's own CRC-32 held, so its bytes are as written: the model was computed differently here."""
    if header.version < 2:
        here = numerics_tag(model)
        differs = f", this machine {here}" if here != header.numerics else ""
        return FlowmnistError(
            f"{name}: does not decode to its checksum: a format-1 file (float nets) decodes only on the CPU kind "
            f"and PyTorch build that wrote it (it names {header.numerics}{differs})"
        )
    return FlowmnistError(
        f"{name}: does not decode to its checksum though the file's own CRC-32 holds: this machine computed "
        f"the model differently from the one that wrote it (the file names {header.numerics})"
    )


def compress(model: torch.nn.Module, images, *, name: str = "", params: CodecParams | None = None) -> bytes:
    """Lossless compression of uint8 images (N, H, W) or (N, 1, H, W) of the model's size by bits-back coding with
    ``model``; about its single-sample bound in bits per image. ``decompress`` inverts it."""
    return compress_images(model, images, name=name, params=params)[0]


def decompress(data: bytes, model: torch.nn.Module) -> Tensor:
    """The images of a ``compress`` file, uint8 (N, 1, H, W); errors (wrong model, damaged file, newer
    format) are one-line ``FlowmnistError``s."""
    original, header = decompress_bytes(data, model)
    pixels = np.frombuffer(original, np.uint8, header.count * math.prod(header.shape), len(header.idx_header))
    return torch.from_numpy(pixels.reshape(header.count, *header.shape).copy())
