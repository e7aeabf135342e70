"""Figures (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from torch import Tensor  # noqa: E402

from .config import atomic_write_bytes  # noqa: E402


def image_grid(images: Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 (N, 1, H, W) -> one uint8 (rows*(H+pad)+pad, cols*(W+pad)+pad) mosaic."""
    imgs = images.detach().cpu().numpy()[:, 0]
    n, h, w = imgs.shape
    cols = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), 128, dtype=np.uint8)
    for i, img in enumerate(imgs):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = img
    return grid


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Render to memory, then write atomically: no half-written PNG under the final name."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path


def save_grid(images: Tensor, path: str | Path, title: str | None = None, nrow: int | None = None) -> Path:
    """A sample grid as a PNG."""
    grid = image_grid(images, nrow)
    fig, ax = plt.subplots(figsize=(grid.shape[1] / 40, grid.shape[0] / 40 + (0.4 if title else 0)))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.axis("off")
    if title:
        ax.set_title(title)
    return save_figure(fig, path)
