"""The ANS stack the codec writes to: uniform, Gaussian and categorical symbols on ``constriction``'s
AnsCoder (Bamler 2022, https://arxiv.org/abs/2201.01741), each pop the exact inverse of a push."""

from __future__ import annotations

import numpy as np

from .exact import gaussian_cells

PRIOR_RANGE = 2048  # Gaussian symbols -2048..2048 (|z| <= 128 on the 2^-4 grid): the leaky quantizer's floor
# of 2^-24 per symbol costs 4097 * 2^-24 / ln 2 = 0.00035 bits per latent element
SEED = 0x5EED_F10E  # the initial bits are a fixed pseudo-random stream the decoder regenerates


class _Stream:
    """An ``constriction`` AnsCoder with vectorised uniform / Gaussian / categorical pushes and pops.

    ``push_*`` encodes (adds about -log2 P bits), ``pop_*`` decodes (takes them back); ``pop_x(push_x(v))``
    returns v and leaves the stack as it was, for any stack contents."""

    def __init__(self, words: np.ndarray | None = None):
        import constriction

        ans = constriction.stream.stack.AnsCoder
        self.c = ans(words) if words is not None else ans()
        m = constriction.stream.model
        self._uniform = m.Uniform()
        self._gauss = m.QuantizedGaussian(-PRIOR_RANGE, PRIOR_RANGE)
        self._m = m

    def push_uniform(self, v: np.ndarray, size, exact: bool = False) -> None:
        """v in [0, size), as two digits lo + r_lo * hi (see ``_radices``): lo first, then hi."""
        size = np.broadcast_to(np.asarray(size, np.int64), np.shape(v)).ravel()
        v = v.ravel().astype(np.int64)
        r_lo, r_hi = _radices(size, exact)
        if (v < 0).any() or (v >= r_lo * r_hi).any():
            raise ValueError("uniform symbol out of range")
        for digit, radix in ((v % r_lo, r_lo), (v // r_lo, r_hi)):
            coded = radix >= 2
            if coded.any():
                self.c.encode_reverse(digit[coded].astype(np.int32), self._uniform, radix[coded].astype(np.int32))

    def pop_uniform(self, size, shape: tuple[int, ...], exact: bool = False) -> np.ndarray:
        """The inverse of ``push_uniform``: hi first, then lo."""
        r_lo, r_hi = _radices(np.broadcast_to(np.asarray(size, np.int64), shape).ravel(), exact)
        digits = []
        for radix in (r_hi, r_lo):
            d, coded = np.zeros(radix.shape, np.int64), radix >= 2
            if coded.any():
                d[coded] = self.c.decode(self._uniform, radix[coded].astype(np.int32))
            digits.append(d)
        return (digits[0] * r_lo + digits[1]).reshape(shape)

    def push_gauss(self, v: np.ndarray, mean: np.ndarray, std: np.ndarray) -> None:
        v = v.ravel()
        if (np.abs(v) > PRIOR_RANGE).any():
            raise ValueError("latent outside the codec's range")
        self.c.encode_reverse(v.astype(np.int32), self._gauss, mean.ravel(), std.ravel())

    def pop_gauss(self, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
        return self.c.decode(self._gauss, mean.ravel(), std.ravel()).astype(np.int64)

    def push_normal(self, v: np.ndarray, per_unit: int) -> None:
        """Cells c = -PRIOR_RANGE..PRIOR_RANGE of width 1 / per_unit under N(0, 1), their masses a fixed
        table (``exact.gaussian_cells``)."""
        v = v.ravel()
        if (np.abs(v) > PRIOR_RANGE).any():
            raise ValueError("latent outside the codec's range")
        self.c.encode_reverse((v + PRIOR_RANGE).astype(np.int32), _normal_model(self._m, per_unit))

    def pop_normal(self, n: int, per_unit: int) -> np.ndarray:
        return self.c.decode(_normal_model(self._m, per_unit), n).astype(np.int64) - PRIOR_RANGE

    def categorical(self, probs: np.ndarray):
        return self._m.Categorical(probs, perfect=False)

    def push_rows(self, v: np.ndarray, probs: np.ndarray) -> None:
        """One symbol per row of ``probs`` (n, k), each under its own row's categorical."""
        self.c.encode_reverse(v.ravel().astype(np.int32), self._m.Categorical(perfect=False), probs)

    def pop_rows(self, probs: np.ndarray) -> np.ndarray:
        return self.c.decode(self._m.Categorical(perfect=False), probs).astype(np.int64)

    def push_cat(self, v: np.ndarray, model) -> None:
        self.c.encode_reverse(v.ravel().astype(np.int32), model)

    def pop_cat(self, n: int, model) -> np.ndarray:
        return self.c.decode(model, n).astype(np.int64)

    def words(self) -> np.ndarray:
        return self.c.get_compressed()


class _NullStream:
    """A stream that holds nothing: every pop gives zeros, every push is dropped. Running the layer coders on
    it maps images to latents deterministically (every scale step's remainder 0), without coding."""

    def pop_uniform(self, size, shape: tuple[int, ...], exact: bool = False) -> np.ndarray:
        return np.zeros(shape, np.int64)

    def push_uniform(self, v, size, exact: bool = False) -> None:
        pass

    def push_normal(self, v, per_unit: int) -> None:
        pass


_NORMAL_MODELS: dict = {}


def _normal_model(m, per_unit: int):
    if per_unit not in _NORMAL_MODELS:
        _NORMAL_MODELS[per_unit] = m.Categorical(gaussian_cells(-PRIOR_RANGE, PRIOR_RANGE, per_unit), perfect=False)
    return _NORMAL_MODELS[per_unit]


def _radices(size: np.ndarray, exact: bool) -> tuple[np.ndarray, np.ndarray]:
    """Two radices (r_lo, r_hi) per uniform of ``size``, each a symbol constriction codes nearly exactly.

    constriction quantises probabilities to multiples of 2^-24 and gives the remainder to the last symbol,
    so U{0..N-1} costs about (2^24 mod N) / 2^24 bits more than log2 N unless N is a power of two: 0.02
    bits at N ~ 2^16, 3e-6 at N ~ 2^10. Powers of two split into two exact digits (2^20 at most each);
    another N below 2^11 is one digit; a larger one (only for what the encoder pushes, never pops:
    ``exact`` False) is 2^s times U{0..H-1}, H = ceil(N / 2^s) in [2^10, 2^11], which wastes
    log2(H 2^s / N) < 2^-10 / ln 2 bits of code space."""
    pow2 = (size & (size - 1)) == 0
    bits = np.frexp(np.maximum(size, 1).astype(np.float64))[1].astype(np.int64) - 1  # floor(log2), exactly
    r_lo, r_hi = size.copy(), np.ones_like(size)
    big = pow2 & (bits > 20)
    r_lo[big], r_hi[big] = 1 << 20, size[big] >> 20
    mixed = ~pow2 & (size >= 1 << 11) & (not exact)
    s = bits[mixed] - 10
    r_lo[mixed], r_hi[mixed] = np.int64(1) << s, (size[mixed] + (np.int64(1) << s) - 1) >> s
    if (r_lo >= 1 << 24).any() or (r_hi >= 1 << 24).any():
        raise ValueError("uniform size too large")
    return r_lo, r_hi


def _seed(n: int, version: int = 2) -> np.ndarray:
    """The initial bits: n pseudo-random nonzero 32-bit words from a fixed seed, regenerated by the decoder.
    Format 2: splitmix64 (Steele, Lea & Flood 2014) in wrapping uint64 arithmetic, the same on every
    machine and numpy version; format 1: numpy's PCG64 ``integers`` stream."""
    if version < 2:
        return np.random.Generator(np.random.PCG64(SEED)).integers(1, 1 << 32, n, dtype=np.uint32)
    z = np.uint64(SEED) + np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    words = ((z ^ (z >> np.uint64(31))) >> np.uint64(32)).astype(np.uint32)
    return np.where(words == 0, np.uint32(1), words)
