"""Shared fixtures: small synthetic MNIST-like IDX directories, the real 10k subset when present, and one
tiny trained run made once per session (for the figure and report tests)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from flowmnist.data import FILES, read_idx, write_idx

torch.set_num_threads(min(2, torch.get_num_threads()))

N_FIGURE_IMAGES = 240  # train 200 / val 40: a few steps and two interpolation pairs, fast on CPU
REAL_DATA = Path(os.environ.get("FLOWMNIST_TEST_DATA", Path(__file__).resolve().parents[2] / "shared/data/mnist-10k"))


def synthetic_digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n uint8 28x28 images of ten stroke patterns (label = pattern), mostly 0 with saturated strokes."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    yy, xx = np.mgrid[0:28, 0:28]
    images = np.zeros((n, 28, 28), dtype=np.float64)
    for i, k in enumerate(labels):
        cy, cx = 14 + rng.normal(0, 1.5), 14 + rng.normal(0, 1.5)
        angle = k * np.pi / 10
        r = 4 + k % 4 * 1.5
        # a ring of radius r plus a bar at an angle set by the label
        ring = np.exp(-((np.hypot(yy - cy, xx - cx) - r) ** 2) / 1.5)
        d = np.abs((yy - cy) * np.cos(angle) - (xx - cx) * np.sin(angle))
        bar = np.exp(-(d**2) / 1.2) * (np.hypot(yy - cy, xx - cx) < 10)
        images[i] = np.clip(1.6 * np.maximum(ring * (k % 2 == 0), bar), 0, 1)
    return (images * 255).round().astype(np.uint8), labels


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


def require_or_skip(condition: bool, reason: str) -> None:
    """Every test whose prerequisite (real data, a browser, torchrun, a Debian data package) may be
    missing goes through this: skipped with the reason on a developer's machine, but a failure in CI
    (``CI=true``), where a skip would hide a test that never ran."""
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI: missing test prerequisite: {reason}", pytrace=False)
    pytest.skip(reason)


def has_real_data() -> bool:
    return (REAL_DATA / (FILES["train-images"][0] + ".gz")).is_file()


def real_data_or_skip() -> Path:
    require_or_skip(has_real_data(), f"real MNIST subset not found at {REAL_DATA} (set FLOWMNIST_TEST_DATA)")
    return REAL_DATA


# The full official MNIST (60,000 training images and t10k): its val split is held out from the shipped models
FULL_DATA = Path(os.environ.get("FLOWMNIST_FULL_DATA", Path(__file__).resolve().parents[2] / "shared/data/mnist"))


def full_data_or_skip() -> Path:
    found = (FULL_DATA / (FILES["train-images"][0] + ".gz")).is_file()
    require_or_skip(found, f"full MNIST not found at {FULL_DATA} (set FLOWMNIST_FULL_DATA)")
    return FULL_DATA


FASHION = Path("/usr/share/datasets/fashion-mnist")  # where Debian's dataset-fashion-mnist installs it


def fashion_data_or_skip() -> Path:
    have = (FASHION / "t10k-images-idx3-ubyte.gz").is_file()
    require_or_skip(have, f"Fashion-MNIST not found at {FASHION} (apt-get install dataset-fashion-mnist)")
    return FASHION


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


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """240 digits for the figure and report tests: the first 240 real ones, from the same place and by
    the same rule as the real-data tests (REAL_DATA), else synthetic stroke patterns. The figure tests
    check what the tools compute, which holds for either; but the substitution is announced (a warning
    in pytest's summary), and in CI, where the real-data tests fail without the data, it cannot go
    unnoticed."""
    d = tmp_path_factory.mktemp("mnist")
    if has_real_data():
        images = read_idx(REAL_DATA / "train-images-idx3-ubyte.gz")[:N_FIGURE_IMAGES]
        labels = read_idx(REAL_DATA / "train-labels-idx1-ubyte.gz")[:N_FIGURE_IMAGES]
    else:
        warnings.warn(
            f"real MNIST subset not found at {REAL_DATA}: the figure and report tests use synthetic digits",
            stacklevel=1,
        )
        images, labels = synthetic_digits(N_FIGURE_IMAGES)
    write_idx(d / "train-images-idx3-ubyte.gz", images)
    write_idx(d / "train-labels-idx1-ubyte.gz", labels)
    return d


@pytest.fixture(scope="session")
def tiny_run(data_dir, tmp_path_factory) -> Path:
    """A `simple` (uniform dequantization) model trained for one short epoch."""
    from flowmnist.config import Config
    from flowmnist.train import train

    run = tmp_path_factory.mktemp("runs") / "simple"
    cfg = Config(model="simple", data_dir=str(data_dir), epochs=1, batch_size=16, log_every=1, compile=False)
    train(cfg, run, progress=False)
    return run
