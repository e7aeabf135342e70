"""Small checks shared by the figure and report tests."""

from __future__ import annotations

import struct
from pathlib import Path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails unless the file starts like a real PNG."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path}: not a PNG"
    assert data[12:16] == b"IHDR", f"{path}: no IHDR chunk first"
    return struct.unpack(">II", data[16:24])


def assert_png(path: str | Path, min_w: int = 200, min_h: int = 100, max_side: int = 6000) -> None:
    w, h = png_size(path)
    assert min_w <= w <= max_side and min_h <= h <= max_side, f"{path}: implausible size {w}x{h}"
