"""Shared fixtures: a small MNIST-like data directory and one tiny trained run, made once per session.

With $FLOWMNIST_TEST_DATA set (a directory of real MNIST IDX files) the first images of the real
training file are used; otherwise synthetic digit-like images (strokes on a black background, so most
pixels are 0 and some are 255, as in MNIST)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from flowmnist.data import read_idx, write_idx

N_IMAGES = 240  # train 200 / val 40: enough for a few steps and two interpolation pairs, fast on CPU


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


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("mnist")
    real = os.environ.get("FLOWMNIST_TEST_DATA")
    if real and Path(real, "train-images-idx3-ubyte.gz").is_file():
        images = read_idx(Path(real, "train-images-idx3-ubyte.gz"))[:N_IMAGES]
        labels = read_idx(Path(real, "train-labels-idx1-ubyte.gz"))[:N_IMAGES]
    else:
        images, labels = synthetic_digits(N_IMAGES)
    write_idx(d / "train-images-idx3-ubyte.gz", images)
    write_idx(d / "train-labels-idx1-ubyte.gz", labels)
    return d


@pytest.fixture(scope="session")
def tiny_run(data_dir, tmp_path_factory) -> Path:
    """A `simple` (uniform dequantization) model trained for one short epoch."""
    from flowmnist.config import Config
    from flowmnist.train import train

    torch.set_num_threads(1)  # the test machines are shared; small models gain little from threads
    run = tmp_path_factory.mktemp("runs") / "simple"
    train(Config(model="simple", data_dir=str(data_dir), epochs=1, batch_size=16, log_every=1), run, progress=False)
    return run
