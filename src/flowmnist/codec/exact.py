"""Portable elementwise maths: exp, log and what the codec builds from them, the same bits on every machine.

libm's and numpy's ``exp`` / ``log`` / ``tanh`` are free to round differently by CPU kind (numpy picks
AVX2 or AVX-512 loops at run time, libm has FMA variants). IEEE 754 fixes only the basic operations
(+, -, *, /, sqrt, floor, scaling by 2^n) as correctly rounded, so a fixed sequence of them on float64
gives one result everywhere. The functions here use nothing else, on numpy float64 arrays (each
operation a separate ufunc, so no compiler may fuse a multiply and an add):

    exp(x) = 2^n p(r),   n = rint(x / ln 2),  r = x - n ln 2 (Cody & Waite's two-part ln 2, |r| <= 0.35),
             p the Taylor polynomial of degree 13 (remainder < 5e-18);
    log(x) = e ln 2 + 2 atanh(f),  x = m 2^e, m in [sqrt(1/2), sqrt(2)),  f = (m - 1)/(m + 1),
             the odd series of atanh to f^23 (|f| <= 0.172, remainder < 2e-19);
    log1p(x) = log(u) - ((u - 1) - x) / u,   u = 1 + x   (Goldberg's correction of u's rounding).

Both are within a few units in the last place of the true value; what matters for the codec is that they
are the same function on every machine. Arguments of ``exp`` are clamped to [-700, 700], so no result
is subnormal (whose flushing to zero some processes switch on).
"""

from __future__ import annotations

import math

import numpy as np

LN2_HI = 6.93147180369123816490e-01  # the high part has 21 trailing zero bits: n * LN2_HI is exact for |n| < 2^21
LN2_LO = 1.90821492927058770002e-10
INV_LN2 = 1.44269504088896338700e00
SQRT_HALF = 0.70710678118654752440
LN2 = 0.6931471805599453  # ln 2 correctly rounded, a literal rather than a library's log(2)
_EXP_COEF = tuple(1.0 / math.factorial(k) for k in range(14))  # 1/k!: one division each, correctly rounded
_LOG_COEF = tuple(1.0 / (2 * k + 1) for k in range(12))


def exp(x) -> np.ndarray:
    """e^x, |x| clamped to 700."""
    x = np.clip(np.asarray(x, np.float64), -700.0, 700.0)
    n = np.rint(x * INV_LN2)
    r = (x - n * LN2_HI) - n * LN2_LO
    p = np.full_like(r, _EXP_COEF[-1])
    for c in reversed(_EXP_COEF[:-1]):
        p = p * r + c
    return np.ldexp(p, n.astype(np.int64))


def log(x) -> np.ndarray:
    """Natural log of x > 0 (x <= 0 gives nan or -inf-like garbage: callers keep x positive)."""
    m, e = np.frexp(np.asarray(x, np.float64))
    low = m < SQRT_HALF
    m = np.where(low, m * 2.0, m)
    e = (e - low).astype(np.float64)
    f = (m - 1.0) / (m + 1.0)
    f2 = f * f
    p = np.full_like(f, _LOG_COEF[-1])
    for c in reversed(_LOG_COEF[:-1]):
        p = p * f2 + c
    return e * LN2_HI + (e * LN2_LO + 2.0 * f * p)


def log1p(x) -> np.ndarray:
    """log(1 + x) for x > -1, accurate for small x."""
    x = np.asarray(x, np.float64)
    u = 1.0 + x
    exact = u == 1.0
    safe = np.where(exact, 2.0, u)
    return np.where(exact, x, log(safe) - ((safe - 1.0) - x) / safe)


def sigmoid(x) -> np.ndarray:
    """1 / (1 + e^-x), from e^-|x| (no overflow)."""
    x = np.asarray(x, np.float64)
    e = exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def logit(p) -> np.ndarray:
    """log p - log(1 - p) for p in (0, 1)."""
    p = np.asarray(p, np.float64)
    return log(p) - log1p(-p)


def tanh(x) -> np.ndarray:
    """sign(x) (1 - e^-2|x|) / (1 + e^-2|x|)."""
    x = np.asarray(x, np.float64)
    e = exp(-2.0 * np.abs(x))
    return np.sign(x) * ((1.0 - e) / (1.0 + e))


def softplus(x) -> np.ndarray:
    """log(1 + e^x) = max(x, 0) + log1p(e^-|x|)."""
    x = np.asarray(x, np.float64)
    return np.maximum(x, 0.0) + log1p(exp(-np.abs(x)))


def log_dsigmoid(h) -> np.ndarray:
    """log sigmoid'(h) = -softplus(h) - softplus(-h)."""
    return -(softplus(h) + softplus(-np.asarray(h, np.float64)))


def gaussian_cells(lo: int, hi: int, per_unit: int) -> np.ndarray:
    """N(0, 1)'s mass of the cells [c / per_unit, (c + 1) / per_unit), c = lo..hi: Simpson's rule on
    4 sub-intervals of each cell (error below 1e-10 of a cell's mass at per_unit = 16), unnormalised (a
    library sum may add in a CPU-dependent order; the entropy coder normalises in its own fixed order)."""
    c = np.arange(lo, hi + 1, dtype=np.float64)
    h = 1.0 / (4.0 * per_unit)
    dens = [exp(-0.5 * (z * z)) for z in (c / per_unit + j * h for j in range(5))]
    return (dens[0] + 4.0 * dens[1] + 2.0 * dens[2] + 4.0 * dens[3] + dens[4]) * (h / 3.0)
