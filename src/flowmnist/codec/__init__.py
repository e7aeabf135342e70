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
  fixed noise (``chunk._label_posterior``), then codes z' = (z - mu_y) / sigma_y by a shift and a scale step
  and y under p(y); the decoder, once it knows x, encodes y again under q. A file then costs the marginal
  bound -log p(x) plus the small KL(q || p(y | x, u)).

The package, in the order of the data: ``plan`` (the model as the codec sees it, checked once),
``layers`` (one (encode, decode) pair per layer type in ``CODERS``), ``chunk`` (a chunk of images through
the whole model, both ways), ``ans`` (the ANS stack), ``intnet`` (the integer nets), ``exact`` (the
portable functions), ``fileformat`` (the header); this module: the file, its streams and their workers.

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
import math
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..config import FlowmnistError
from .ans import PRIOR_RANGE as PRIOR_RANGE
from .ans import _seed, _Stream
from .chunk import decode_chunk, encode_chunk
from .fileformat import FORMAT_VERSION as FORMAT_VERSION
from .fileformat import CodecParams, Header, _read_header, chunk_sizes, idx_bytes, stream_sizes
from .fileformat import read_header as read_header
from .plan import Plan, make_plan, model_sha256, numerics_tag, weights_sha256

DEFAULT_STREAMS = 2  # streams of a large file unless told (``default_streams``): two cores' worth
STREAM_IMAGES = 1000  # a stream per this many images at least: its start-up bits stay below 2.6 %


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
    plan = make_plan(model, params, version)
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


def _encode_stream(plan: Plan, arr: np.ndarray, first: int, progress) -> tuple[np.ndarray, float]:
    """One stream: images ``arr`` (numbered from ``first`` in messages) on a fresh stack over the initial
    bits; returns its words and the images' summed bound in bits."""
    params = plan.params
    st = _Stream(_seed(params.seed_words, plan.fmt))
    bound, start = 0.0, 0
    with _nets_threads(plan.fmt):
        for b in chunk_sizes(len(arr), params.batch, params.ramp):
            x = torch.from_numpy(arr[start : start + b].copy()).unsqueeze(1)
            try:
                bound += float(encode_chunk(st, plan, x).sum()) / math.log(2)
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
    plan = make_plan(model, header.params, header.version)
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


def _decode_stream(plan: Plan, count: int, words: np.ndarray, name: str, header: Header, progress) -> np.ndarray:
    """One stream's ``count`` images, last chunk first; the stack must end as the initial bits."""
    st = _Stream(words)
    sizes = chunk_sizes(count, header.params.batch, header.params.ramp)
    out = np.zeros((count, *plan.shape[1:]), np.uint8)
    end = count
    with _nets_threads(plan.fmt):
        for b in reversed(sizes):
            try:
                out[end - b : end] = decode_chunk(st, plan, b)[:, 0].numpy()
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


def _map_streams(fn: Callable, plan: Plan, jobs: list[tuple], workers: int | None, progress) -> list:
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
    _WORKER.update(plan=make_plan(model, params, fmt), queue=queue)


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
