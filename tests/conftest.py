"""Shared fixtures: small synthetic MNIST-like IDX directories, and the real 10k subset when present."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from flowmnist.data import FILES, read_idx, write_idx

torch.set_num_threads(min(2, torch.get_num_threads()))

REAL_DATA = Path(os.environ.get("FLOWMNIST_TEST_DATA", Path(__file__).resolve().parents[2] / "shared/data/mnist-10k"))


def synthetic_digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n 28x28 uint8 'digits': a bright stroke (a thick line through the centre at a random angle)
    on a black background, so the data has MNIST's heavy mass at 0 and some structure to learn."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28] - 13.5
    imgs = np.zeros((n, 28, 28), dtype=np.uint8)
    for i in range(n):
        a = rng.uniform(0, np.pi)
        dist = np.abs(xx * np.sin(a) - yy * np.cos(a))
        stroke = np.clip(1.5 - dist / 1.5, 0, 1) * (np.hypot(xx, yy) < 10)
        imgs[i] = np.round(255 * stroke).astype(np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    return imgs, labels


def write_mnist_dir(root: Path, n_train: int, n_test: int = 0, gz: bool = True, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    sfx = ".gz" if gz else ""
    imgs, labels = synthetic_digits(n_train, seed)
    write_idx(root / (FILES["train-images"][0] + sfx), imgs)
    write_idx(root / (FILES["train-labels"][0] + sfx), labels)
    if n_test:
        imgs, labels = synthetic_digits(n_test, seed + 1)
        write_idx(root / (FILES["test-images"][0] + sfx), imgs)
        write_idx(root / (FILES["test-labels"][0] + sfx), labels)
    return root


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    """48 training images (40 train / 8 val) and 8 t10k test images."""
    return write_mnist_dir(tmp_path / "data", 48, 8)


def real_data_or_skip() -> Path:
    if not (REAL_DATA / (FILES["train-images"][0] + ".gz")).is_file():
        pytest.skip(f"real MNIST subset not found at {REAL_DATA} (set FLOWMNIST_TEST_DATA)")
    return REAL_DATA


@pytest.fixture(scope="session")
def real_digits() -> torch.Tensor:
    """The first 64 real MNIST training images, uint8 (64, 1, 28, 28)."""
    root = real_data_or_skip()
    return torch.from_numpy(read_idx(root / (FILES["train-images"][0] + ".gz"))[:64].copy()).unsqueeze(1)


@pytest.fixture(scope="session")
def real_subset(tmp_path_factory) -> Path:
    """A directory with the first 1,200 real training images (1,000 train / 200 val)."""
    root = real_data_or_skip()
    out = tmp_path_factory.mktemp("real1200")
    imgs = read_idx(root / (FILES["train-images"][0] + ".gz"))[:1200]
    labels = read_idx(root / (FILES["train-labels"][0] + ".gz"))[:1200]
    write_idx(out / (FILES["train-images"][0] + ".gz"), imgs)
    write_idx(out / (FILES["train-labels"][0] + ".gz"), labels)
    return out
