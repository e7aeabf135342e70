"""Small checks shared by the tests: PNG files (read and written), weights moved off their initial values, and the
models' pinned parameter counts."""

from __future__ import annotations

import struct
from pathlib import Path

import torch

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The unconditional models' parameter counts, pinned: an architecture change must change them here.
PARAMS = {
    "simple": 556_312,
    "vardeq": 628_388,
    "multi-simple": 1_639_742,
    "multi-vardeq": 1_711_818,
    "multi-vardeq-wide": 6_497_730,
    "multi-vardeq-mixlog": 2_251_458,
    "multi-vardeq-glow": 1_712_514,
    "multi-vardeq-glow-wide": 6_499_122,
    "multi-vardeq-glow-deep": 9_284_466,
    "flowpp": 9_698_826,
}


def png_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails unless the file starts like a real PNG."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path}: not a PNG"
    assert data[12:16] == b"IHDR", f"{path}: no IHDR chunk first"
    return struct.unpack(">II", data[16:24])


def write_png(path: Path, pixels) -> Path:
    """An image array (H x W gray, H x W x 3 RGB or x 4 RGBA, uint8) as a PNG file; returns its path."""
    from PIL import Image

    Image.fromarray(pixels).save(path)
    return path


def assert_png(path: str | Path, min_w: int = 200, min_h: int = 100, max_side: int = 6000) -> None:
    w, h = png_size(path)
    assert min_w <= w <= max_side and min_h <= h <= max_side, f"{path}: implausible size {w}x{h}"


def perturb(module: torch.nn.Module, scale: float = 0.02, seed: int = 0) -> torch.nn.Module:
    """Add seeded N(0, scale^2) noise to every parameter, in place; returns the module.

    The coupling nets' output convolutions start at zero, which makes every coupling the identity (and
    blocks the gradients of the layers below): a test of an untrained model would check almost nothing.
    The noise comes from its own generator, so the caller's random stream is left alone."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module
