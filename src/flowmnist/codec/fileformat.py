"""The compressed file: its parameters, its header and its checks.

Layout (little-endian): magic ``FMNZ``, format version (u16), the header's length (u32) and the header
(JSON: model name, SHA-256 of what the codec computes with, numerics tag, ``CodecParams``, image count,
IDX header, CRC-32 of the original IDX bytes, source kind, initial-bits bookkeeping, the images' shape
[1, H, W]; a header without one holds MNIST's 28x28), the ANS words
(u32 each), and a CRC-32 of everything before it.

Format 3 codes the images as S independent streams (the first n_1 images, the next n_2, ...), each its
own ANS stack on its own initial bits, so that S processes encode and decode them side by side; the
header's ``streams`` lists each one's [images, kept, words] and the words follow stream after stream.
Formats 1 and 2 hold one stream (``kept`` and ``words`` in the header).
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import asdict, dataclass

import numpy as np

from ..config import MNIST_SHAPE, FlowmnistError
from .intnet import IntSpec

MAGIC = b"FMNZ"
FORMAT_VERSION = 3  # 3: S streams; 2: integer nets and portable maths; 1: float nets (decoded where they compute alike)
READS = (1, 2, 3)


@dataclass(frozen=True)
class CodecParams:
    """Grids and schedule of a file, recorded in its header.

    grid_bits:   the main flow's grid, delta_z = 2^-grid_bits (logit space and every coupling's output)
    noise_bits:  the dequantization noise's grid below g_x, delta_y = 2^-noise_bits (h for a variational
                 model, u itself for uniform dequantization)
    prior_bits:  the Gaussians are coded on the grid 2^-prior_bits
    base_bits:   the logistic base h0 of q is coded as a categorical over cells of 2^-base_bits
    batch, ramp: chunk sizes min(batch, max(1, images_done // ramp)): the first images, with few bits on
                 the stack to give back, go one by one, so the start-up cost is about one image's noise
    seed_words:  length of the initial-bits stream (32-bit words)
    act_bits, weight_bits, range_bits: the integer nets' widths (``intnet.IntSpec``; format 2)
    """

    grid_bits: int = 16
    noise_bits: int = 20
    prior_bits: int = 4
    base_bits: int = 4
    batch: int = 32
    ramp: int = 32
    seed_words: int = 1 << 14
    act_bits: int = IntSpec.act_bits  # the widths' defaults live in one place: IntSpec
    weight_bits: int = IntSpec.weight_bits
    range_bits: int = IntSpec.range_bits

    @property
    def spec(self) -> IntSpec:
        return IntSpec(self.act_bits, self.weight_bits, self.range_bits)

    def check(self) -> None:
        ok = (
            4 <= self.prior_bits < self.grid_bits <= 20
            and 1 <= self.base_bits < self.noise_bits <= 30
            and self.batch >= 1
            and self.ramp >= 1
            and 16 <= self.seed_words <= 1 << 24
            and 4 <= self.act_bits <= min(16, self.grid_bits)
            and 4 <= self.weight_bits <= 16
            and 1 <= self.range_bits <= 19 - self.act_bits + 7
        )
        if not ok:
            raise FlowmnistError(f"codec parameters out of range: {self}")


def chunk_sizes(n: int, batch: int, ramp: int) -> list[int]:
    """The batch partition both sides use: min(batch, max(1, done // ramp)) images per chunk."""
    sizes, done = [], 0
    while done < n:
        b = min(batch, max(1, done // ramp), n - done)
        sizes.append(b)
        done += b
    return sizes


def stream_sizes(n: int, streams: int) -> list[int]:
    """Images per stream: n split into ``streams`` runs of consecutive images, the first ones a image longer."""
    return [n // streams + (i < n % streams) for i in range(streams)]


@dataclass
class Header:
    """Everything before the ANS words. ``kept`` is how many of the initial-bits words stay at the bottom
    of the stack untouched (the decoder regenerates them), ``words`` how many words follow; format 3:
    ``streams`` holds (images, kept, words) of each stream and ``kept`` and ``words`` are their sums."""

    model_name: str
    weights_sha256: str
    numerics: str
    params: CodecParams
    count: int
    idx_header: bytes
    crc32: int
    source: str
    kept: int
    words: int
    version: int = FORMAT_VERSION
    shape: tuple[int, int, int] = MNIST_SHAPE  # (1, H, W) of the images
    streams: tuple[tuple[int, int, int], ...] = ()

    def parts(self) -> list[tuple[int, int, int]]:
        """(images, kept, words) of each stream, in file order."""
        return [tuple(p) for p in self.streams] if self.version >= 3 else [(self.count, self.kept, self.words)]

    def pack(self) -> bytes:
        meta = {
            "model": self.model_name,
            "sha256": self.weights_sha256,
            "numerics": self.numerics,
            "params": asdict(self.params),
            "count": self.count,
            "idx_header": self.idx_header.hex(),
            "crc32": self.crc32,
            "source": self.source,
            "kept": self.kept,
            "words": self.words,
        }
        if self.version >= 3 or self.shape != MNIST_SHAPE:  # a format-2 file of MNIST digits as written before
            meta["shape"] = list(self.shape)
        if self.version >= 3:
            meta["streams"] = [list(p) for p in self.streams]
        blob = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
        return MAGIC + struct.pack("<HI", self.version, len(blob)) + blob


def _read_header(data: bytes, name: str) -> tuple[Header, int]:
    """Parse and check the fixed part; returns the header and the offset of the ANS words."""
    if len(data) < 10 or data[:4] != MAGIC:
        raise FlowmnistError(f"{name}: not a flowmnist compressed file (no FMNZ magic)")
    version, n = struct.unpack("<HI", data[4:10])
    if version not in READS:
        newer = "; a newer flowmnist wrote it" if version > FORMAT_VERSION else ""
        reads = f"this flowmnist reads versions 1 to {FORMAT_VERSION}"
        raise FlowmnistError(f"{name}: format version {version}, {reads}{newer}")
    if len(data) < 10 + n + 4:
        raise FlowmnistError(f"{name}: truncated ({len(data)} bytes, shorter than its header)")
    try:
        m = json.loads(data[10 : 10 + n])
        h = Header(
            *(m["model"], m["sha256"], m["numerics"], CodecParams(**m["params"]), int(m["count"])),
            *(bytes.fromhex(m["idx_header"]), int(m["crc32"]), m["source"], int(m["kept"]), int(m["words"])),
            version,
            _shape(m.get("shape", MNIST_SHAPE)),
            tuple(tuple(int(v) for v in p) for p in m["streams"]) if version >= 3 else (),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise FlowmnistError(f"{name}: damaged header ({type(e).__name__})") from e
    if version >= 3:
        _check_streams(h, name)
    want = 10 + n + 4 * h.words + 4
    if zlib.crc32(data[:-4]) != struct.unpack("<I", data[-4:])[0] or len(data) != want:
        what = "truncated" if len(data) < want else "damaged (CRC-32 mismatch)"
        raise FlowmnistError(f"{name}: {what} ({len(data)} bytes, its header says {want})")
    return h, 10 + n


def _check_streams(h: Header, name: str) -> None:
    """A format-3 header's streams: triples of counts that add up to its image count and word count."""
    parts = h.streams
    bad = (
        not parts
        or any(len(p) != 3 or min(p) < 0 or p[1] > h.params.seed_words for p in parts)
        or sum(p[0] for p in parts) != h.count
        or sum(p[1] for p in parts) != h.kept
        or sum(p[2] for p in parts) != h.words
    )
    if bad:
        raise FlowmnistError(
            f"{name}: damaged header (its {len(parts)} streams do not add up to its {h.count} images "
            f"and {h.words} words)"
        )


def _shape(value) -> tuple[int, int, int]:
    """A header's image shape: three positive integers, one channel, else ValueError (a damaged header)."""
    shape = tuple(int(n) for n in value)
    if len(shape) != 3 or shape[0] != 1 or min(shape) < 1:
        raise ValueError(f"image shape {value}")
    return shape  # type: ignore[return-value]


def idx_bytes(images: np.ndarray) -> bytes:
    """The IDX file of uint8 images (N, H, W): magic 0x00000803, three big-endian sizes, the pixels."""
    return bytes([0, 0, 8, 3]) + struct.pack(">3I", *images.shape) + images.tobytes()


def read_header(data: bytes, name: str = "<bytes>") -> Header:
    """The header of a compressed file, checked (magic, version, CRC-32, length)."""
    return _read_header(data, name)[0]
