"""The coupling nets in exact integer arithmetic (integer networks, Ballé, Johnston & Minnen 2019,
https://arxiv.org/abs/1810.12766): the same outputs on every CPU kind, thread count and PyTorch build.

A ``GatedConvNet`` (nets.py) becomes an ``IntNet`` whose every value is an integer:

* activations in units of 2^-A (``IntSpec.act_bits``), clamped to |a| <= 2^(A+R) (``range_bits``);
* each convolution's weights as integers of ``weight_bits`` bits w_q = rint(w 2^f), with f per
  convolution chosen so that max |w_q| < 2^(weight_bits - 1), its bias b_q = rint(b 2^(A+f));
  output = floor((sum w_q a + b_q) / 2^f), clamped;
* ELU(x) = round(2^A (e^(x 2^-A) - 1)) for x <= 0 and sigmoid(b) = round(2^A sigmoid(b 2^-A)) by
  lookup tables over the integers where they are not yet saturated (``exact.exp`` makes them, the same
  everywhere);
* the gate x + floor(a sigmoid(b) / 2^A); the channel layer norm in integers (below).

The default widths (A = 10, 12-bit weights, R = 13) were chosen by ``benchmarks/codec_numerics.py``: they
cost at most 0.001 bits/dim against the float nets on every shipped model. Range, not rounding, is what
costs: a model trained longer has larger activations (A = 12 with R = 10 cost the long run 0.007).

**Why the convolutions are exact.** They run as float64 matrix products on tensors holding integers,
channels first (C, B, H, W): a 1x1 convolution is one product (C_out, C_in) x (C_in, B H W); a k x k one
lays the images end to end with the zero padding shared between neighbours (``IConv``) and adds, for
each of its k^2 taps, the tap's (C_out, C_in) weights times the inputs shifted by the tap's offset (a
slice of the same buffer, so nothing is copied), which keeps the products long and avoids
``F.conv2d``'s slow float64 path. Every
product w_q a and every partial sum of them (in whatever order a kernel adds them) is an integer of
magnitude at most  sum_i |w_q,i| 2^(A+R) + |b_q| , which ``IConv`` checks to be below 2^53 when it is
built; an integer below 2^53 is a float64 exactly, so no product or sum rounds and every CPU kernel
(default, AVX2, AVX-512; one thread or many; any BLAS) returns the same integers. The inputs are bounded
by 2^(A+R) because every conv output, gate and norm output is clamped, and ELU (|ELU(x)| <= |x| or
<= 2^A) keeps the bound.

**Layer norm in integers.** Over the n channels of a pixel, with S1 = sum x, S2 = sum x^2 (exact in
float64: S2 <= n 4^(A+R) < 2^53), n^2 var = V = n S2 - S1^2 (int64) and n (x - mean) = d = n x - S1 exactly;
(x - mean) / sqrt(var + eps) 2^A = floor(d 2^(A+G) / isqrt((V + E) 4^G)),  E = rint(n^2 eps 4^A), G guard
bits, isqrt the exact integer square root (a float sqrt corrected by one step each way). ``INorm``
takes the largest G <= 5 with n^2 4^(A+R) + E < 2^(62 - 2G) (V <= n S2 <= n^2 4^(A+R)), so nothing
overflows int64, and checks |d| 2^(A+G) < 2^(A+R+1) n 2^(A+G) < 2^53, so the division's numerator is a
float64 exactly and its floor is exact (``_floor_div``). Then floor(y gamma_q / 2^g) + beta_q, where
|y| <= sqrt(n) 2^A (a normalised value) keeps the product far below 2^53.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor, nn

from . import exact

EXACT = 1 << 53  # integers below this are float64 exactly
NORM_GUARD = 5  # G: extra bits of the layer norm's integer square root, fewer where int64 has no room


@dataclass(frozen=True)
class IntSpec:
    """Bit widths of the integer nets (recorded in a file's header as its numerics)."""

    act_bits: int = 10
    weight_bits: int = 12
    range_bits: int = 13

    def tag(self) -> str:
        return f"int nets A{self.act_bits} W{self.weight_bits} R{self.range_bits}, exact maths v1"

    @property
    def amax(self) -> int:
        return 1 << (self.act_bits + self.range_bits)


@lru_cache(maxsize=4)
def elu_table(a: int) -> np.ndarray:
    """ELU on x = -j 2^-a, j = 0..J, in units 2^-a: round(2^a (e^(-j 2^-a) - 1)); the last entry is -2^a
    (saturated: e^x 2^a < 1/2 for every j >= J)."""
    j_max = math.ceil((a + 1) * exact.LN2 * (1 << a)) + 2
    j = np.arange(j_max + 1, dtype=np.float64)
    t = np.floor((exact.exp(-j * 2.0**-a) - 1.0) * 2.0**a + 0.5).astype(np.int64)
    assert t[-1] == -(1 << a)
    return t


@lru_cache(maxsize=4)
def sigmoid_table(a: int) -> np.ndarray:
    """sigmoid on b = j 2^-a, j = -J..J, in units 2^-a; saturated (0 and 2^a) at both ends."""
    j_max = math.ceil((a + 1) * exact.LN2 * (1 << a)) + 2
    j = np.arange(-j_max, j_max + 1, dtype=np.float64)
    t = np.floor(exact.sigmoid(j * 2.0**-a) * 2.0**a + 0.5).astype(np.int64)
    assert t[0] == 0 and t[-1] == 1 << a
    return t


@lru_cache(maxsize=4)
def _tables(a: int) -> tuple[Tensor, Tensor]:
    return torch.from_numpy(elu_table(a).astype(np.float64)), torch.from_numpy(sigmoid_table(a).astype(np.float64))


def _lookup(table: Tensor, index: Tensor) -> Tensor:
    """table[index] for an int32 index of any shape (``index_select`` on the flat index: the fast gather)."""
    return torch.index_select(table, 0, index.reshape(-1)).view(index.shape)


def concat_elu(x: Tensor, a: int) -> Tensor:
    """[ELU(x), ELU(-x)] along the first (channel) axis in units 2^-a, as ELU(v) = max(v, 0) + T[max(-v, 0)]
    with T the table (T[0] = 0), its index clamped to the table's saturated end."""
    table = _tables(a)[0]
    top = len(table) - 1
    c = x.shape[0]
    out = torch.empty(2 * c, *x.shape[1:], dtype=x.dtype)
    pos, neg = out[:c], out[c:]
    torch.clamp(x, min=0, out=pos)
    torch.neg(x, out=neg).clamp_(min=0)
    pos_t = _lookup(table, neg.clamp(max=top).int())
    neg.add_(_lookup(table, pos.clamp(max=top).int()))
    pos.add_(pos_t)
    return out


def sigmoid(b: Tensor, a: int) -> Tensor:
    table = _tables(a)[1]
    j = (len(table) - 1) // 2
    return _lookup(table, (b.clamp(-j, j) + j).int())


def isqrt(v: Tensor) -> Tensor:
    """floor(sqrt(v)) of int64 v in [0, 2^62], exactly: the float root is within one of it."""
    r = torch.sqrt(v.double()).floor().long()
    r = r - (r * r > v).long()
    return r + ((r + 1) * (r + 1) <= v).long()


def _floor_div(num: Tensor, den: Tensor) -> Tensor:
    """floor(num / den) of integers held in float64, |num| < 2^53, den >= 1, exactly: a quotient that is
    not an integer lies at least 1/den from one, while rounding moves it by at most |num / den| 2^-53 <
    1/den, so the correctly rounded quotient never crosses an integer and its floor is the true one."""
    return torch.div(num, den).floor_()


def _quantize(w: Tensor, bits: int) -> tuple[np.ndarray, int]:
    """(rint(w 2^f) as float64 integers, f) with max |w| 2^f < 2^(bits - 1): f from the float's exponent."""
    w = w.detach().cpu().double().numpy()
    top = float(np.abs(w).max()) if w.size else 0.0
    f = bits - 1 - (math.frexp(top)[1] if top > 0 else 0)
    return np.rint(np.ldexp(w, f)), f


class IConv:
    """A convolution (padding keeps the size) on activations in units 2^-A, channels first (C, B, H, W)."""

    def __init__(self, conv: nn.Conv2d, spec: IntSpec):
        self.spec = spec
        w, self.f = _quantize(conv.weight, spec.weight_bits)
        b = conv.bias.detach().cpu().double().numpy() if conv.bias is not None else np.zeros(w.shape[0])
        bq = np.rint(np.ldexp(b, spec.act_bits + self.f))
        self.pad = conv.padding[0] if isinstance(conv.padding, tuple) else conv.padding
        bound = np.abs(w).reshape(len(w), -1).sum(1) * spec.amax + np.abs(bq)
        if bound.max(initial=0) >= EXACT:
            raise ValueError(f"a convolution's integer sums reach {bound.max():.3g} >= 2^53")
        self.weight, self.bias = torch.from_numpy(w), torch.from_numpy(bq)
        self.k = w.shape[-1]
        # tap (dy, dx)'s (co, ci) matrix at index dy k + dx
        self.taps = [self.weight[:, :, dy, dx].contiguous() for dy in range(self.k) for dx in range(self.k)]

    def __call__(self, x: Tensor) -> Tensor:
        ci, b, h, w = x.shape
        k, p, co = self.k, self.pad, len(self.bias)
        if k == 1:
            out = torch.addmm(self.bias[:, None], self.taps[0], x.reshape(ci, -1)).view(co, b, h, w)
        else:
            # The images end to end, each row and each image followed by p zeros (which pad the next one's
            # left and top too), after ``lead`` zeros: tap (dy, dx) of the output at flat position i
            # reads position i + dy wp + dx, so each tap is one product over a shifted slice, no copies.
            hp, wp = h + p, w + p
            n, lead = b * hp * wp, p * wp + p
            flat = x.new_zeros(ci, lead + n + lead)
            flat[:, lead : lead + n].view(ci, b, hp, wp)[:, :, :h, :w] = x
            out = torch.addmm(self.bias[:, None], self.taps[0], flat[:, :n])
            for tap in range(1, k * k):
                dy, dx = divmod(tap, k)
                out.addmm_(self.taps[tap], flat[:, dy * wp + dx : dy * wp + dx + n])
        out.mul_(2.0**-self.f).floor_().clamp_(-self.spec.amax, self.spec.amax)  # power-of-two scaling: exact
        return out if k == 1 else out.view(co, b, hp, wp)[:, :, :h, :w]

    def arrays(self) -> list[np.ndarray]:
        return [self.weight.numpy().astype(np.int64), self.bias.numpy().astype(np.int64), np.array([self.f])]


class INorm:
    """LayerNormChannels in integers (module docstring)."""

    def __init__(self, norm: nn.Module, spec: IntSpec):
        self.spec = spec
        n = norm.gamma.numel()
        g, self.g = _quantize(norm.gamma.reshape(-1), spec.weight_bits)
        beta = np.rint(np.ldexp(norm.beta.detach().cpu().double().numpy().reshape(-1), spec.act_bits))
        self.eps = int(np.rint(n * n * float(norm.eps) * 4.0**spec.act_bits))
        top = n * n * spec.amax**2 + self.eps
        self.guard = next((g for g in range(NORM_GUARD, -1, -1) if top < 1 << (62 - 2 * g)), None)
        if self.guard is None:
            raise ValueError(f"layer norm over {n} channels overflows int64")
        if n << (spec.act_bits + spec.range_bits + 1 + spec.act_bits + self.guard) >= EXACT:
            raise ValueError(f"layer norm over {n} channels exceeds float64's exact integers")
        self.gamma, self.beta = torch.from_numpy(g), torch.from_numpy(beta)

    def __call__(self, x: Tensor) -> Tensor:
        a, n = self.spec.act_bits, x.shape[0]
        s1 = x.sum(0)  # |S1| <= n 2^(A+R), S2 <= n 4^(A+R) < 2^53: exact in float64
        v = n * (x * x).sum(0).long() - s1.long() ** 2  # up to n^2 4^(A+R): int64
        r = isqrt((v + self.eps) << (2 * self.guard)).double()
        num = (n * x - s1).mul_(2.0 ** (a + self.guard))  # |num| < 2^(A+R+1) n 2^(A+G) < 2^53
        y = _floor_div(num, r)
        y = y.mul_(self.gamma.view(-1, 1, 1, 1)).mul_(2.0**-self.g).floor_().add_(self.beta.view(-1, 1, 1, 1))
        return y.clamp_(-self.spec.amax, self.spec.amax)

    def arrays(self) -> list[np.ndarray]:
        gamma, beta = self.gamma.numpy().astype(np.int64), self.beta.numpy().astype(np.int64)
        return [gamma, beta, np.array([self.g, self.eps, self.guard])]


class IGate:
    """x + a sigmoid(b),  [a, b] = conv1x1(ConcatELU(conv3x3(ConcatELU(x)))), in integers."""

    def __init__(self, block: nn.Module, spec: IntSpec):
        convs = [m for m in block.net if isinstance(m, nn.Conv2d)]
        self.spec, self.c1, self.c2 = spec, IConv(convs[0], spec), IConv(convs[1], spec)

    def __call__(self, x: Tensor) -> Tensor:
        a = self.spec.act_bits
        h = self.c2(concat_elu(self.c1(concat_elu(x, a)), a))
        p, q = h.chunk(2, dim=0)
        y = sigmoid(q, a).mul_(p).mul_(2.0**-a).floor_().add_(x)  # |p sigmoid| < 2^(2A+R) < 2^53: exact
        return y.clamp_(-self.spec.amax, self.spec.amax)

    def arrays(self) -> list[np.ndarray]:
        return self.c1.arrays() + self.c2.arrays()


class IntNet:
    """A ``GatedConvNet`` in integers: conv3x3, [gate, layer norm] x L, ConcatELU, conv3x3; integers in and
    out (units 2^-A), held in float64 tensors (exact below 2^53; int64 inside the layer norm). Refuses a
    net with other blocks (self-attention)."""

    def __init__(self, net: nn.Module, spec: IntSpec):
        from ..nets import ConcatELU, GatedConv, LayerNormChannels

        self.spec = spec
        layers = list(net.net)
        self.stages: list = [IConv(layers[0], spec)]
        for m in layers[1:-2]:
            if isinstance(m, GatedConv):
                self.stages.append(IGate(m, spec))
            elif isinstance(m, LayerNormChannels):
                self.stages.append(INorm(m, spec))
            else:
                raise ValueError(f"{type(m).__name__} in a coupling net has no integer form")
        if not isinstance(layers[-2], ConcatELU) or not isinstance(layers[-1], nn.Conv2d):
            raise ValueError("a coupling net must end in ConcatELU and a convolution")
        self.out = IConv(layers[-1], spec)

    def __call__(self, x: Tensor) -> Tensor:
        """Integers (B, C, H, W) in, integers (B, C', H, W) out; channels first (C, B, H, W) inside."""
        x = x.double().transpose(0, 1).contiguous()
        for stage in self.stages:
            x = stage(x)
        return self.out(concat_elu(x, self.spec.act_bits)).long().transpose(0, 1)

    def arrays(self) -> list[np.ndarray]:
        return [a for s in [*self.stages, self.out] for a in s.arrays()]


def fixed(k: Tensor, grid_bits: int, a: int) -> Tensor:
    """Grid values (k + 1/2) 2^-grid_bits in units 2^-a, floored: (2k + 1) >> (grid_bits + 1 - a)."""
    return torch.div(2 * k + 1, 1 << (grid_bits + 1 - a), rounding_mode="floor")


def image_condition(x: Tensor, a: int) -> Tensor:
    """The image as the dequantization's nets see it, x / 255 * 2 - 1, in units 2^-a (floored)."""
    return torch.div((2 * x.long() - 255) << a, 255, rounding_mode="floor")


def sha256_of(arrays: list[np.ndarray], tag: str) -> str:
    """SHA-256 over the numerics tag and every integer (int64, little-endian) the codec computes with."""
    h = hashlib.sha256(tag.encode())
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype="<i8").tobytes())
    return h.hexdigest()
