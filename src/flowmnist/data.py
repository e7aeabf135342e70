"""MNIST and Fashion-MNIST: IDX reading and validation, checksummed download, seeded splits, in-memory
batches.

Images stay in memory as uint8 tensors (N, 1, 28, 28) with values 0..255: MNIST is 47 MB at most,
so there is no DataLoader and no worker overhead.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import urllib.request
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .config import FlowmnistError, atomic_write_bytes

if TYPE_CHECKING:
    from .config import Config

IMAGE_SHAPE = (1, 28, 28)  # (channels, height, width) of every image: MNIST's and Fashion-MNIST's


class DataError(FlowmnistError):
    """A missing, damaged or inconsistent data file."""


# Official file names (stem, without .gz) and the MD5 of the official .gz files.
FILES = {
    "train-images": ("train-images-idx3-ubyte", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "train-labels": ("train-labels-idx1-ubyte", "d53e105ee54ea40749a09fcbcd1e9432"),
    "test-images": ("t10k-images-idx3-ubyte", "9fb629c4189551a2d022fa330f9573f3"),
    "test-labels": ("t10k-labels-idx1-ubyte", "ec29112dd5afa0611ce80d1b7f02629c"),
}
# torchvision's mirror list, in its order; LeCun's site now refuses most requests.
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
# Fashion-MNIST (Xiao et al. 2017): the same IDX format and file names; MD5s of the official .gz files as
# its README lists them (also in Debian's dataset-fashion-mnist docs). Debian's own .gz files hash
# differently: their gzip headers are normalised (no file name, the package's mtime), and each is
# shorter than the official file by exactly its name's length + 1 (t10k-images: 4,422,079 vs 4,422,102).
FASHION_FILES = {
    "train-images": ("train-images-idx3-ubyte", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    "train-labels": ("train-labels-idx1-ubyte", "25c81989df183df01b3e8a0aad5dffbe"),
    "test-images": ("t10k-images-idx3-ubyte", "bef4ecab320f06d8554ea6380940ec79"),
    "test-labels": ("t10k-labels-idx1-ubyte", "bb300cfdad3c16e7a12a480ee83cd310"),
}
FASHION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)  # the official one (MD5-checked)
SPLITS = ("train", "val", "test")


class Dataset(NamedTuple):
    """A downloadable IDX dataset: its display name, {key: (file stem, MD5 of the .gz)}, mirrors in order."""

    title: str
    files: dict[str, tuple[str, str]]
    mirrors: tuple[str, ...]


# The datasets `load_idx_dir` can download by name (a data directory is read whatever it holds).
DATASETS = {
    "mnist": Dataset("MNIST", FILES, MIRRORS),
    "fashion-mnist": Dataset("Fashion-MNIST", FASHION_FILES, FASHION_MIRRORS),
}


def get_dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return DATASETS[name]


def default_cache_dir(dataset: str = "mnist") -> Path:
    return Path(os.environ.get("FLOWMNIST_CACHE", Path.home() / ".cache" / "flowmnist")) / dataset


def parse_idx(buf: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse an uncompressed IDX buffer of unsigned bytes; raise DataError on any inconsistency.

    Format: 2 zero bytes, type byte 0x08 (uint8), ndim byte, ndim big-endian uint32 sizes, then data.
    """
    if len(buf) < 4:
        raise DataError(f"{name}: {len(buf)} bytes, too short for an IDX header")
    if buf[0] != 0 or buf[1] != 0 or buf[2] != 0x08:
        magic = int.from_bytes(buf[:4], "big")
        raise DataError(f"{name}: bad magic number 0x{magic:08x} (expected 0x000008NN, unsigned-byte IDX)")
    ndim = buf[3]
    if not 1 <= ndim <= 4:
        raise DataError(f"{name}: IDX header says {ndim} dimensions (expected 1 to 4)")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise DataError(f"{name}: truncated IDX header ({len(buf)} of {header} bytes)")
    dims = struct.unpack(f">{ndim}I", buf[4:header])
    count = math.prod(dims)
    have = len(buf) - header
    if have != count:
        what = "truncated" if have < count else "has trailing bytes"
        raise DataError(
            f"{name}: {what}: header {'x'.join(map(str, dims))} needs {count} bytes of data, file has {have}"
        )
    return np.frombuffer(buf, dtype=np.uint8, count=count, offset=header).reshape(dims)


def read_idx(path: str | Path) -> np.ndarray:
    """Read a raw or gzipped (.gz) IDX file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: not a valid gzip file ({e})") from e
    return parse_idx(raw, str(path))


def find_file(root: Path, stem: str) -> Path | None:
    """The raw file if present, else the .gz one, else None."""
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def download(root: Path, keys=None, mirrors=None, timeout: float = 30, dataset: str = "mnist") -> None:
    """Fetch the missing official .gz files of ``dataset`` into ``root``, verifying each MD5 (``keys``
    and ``mirrors`` default to all its files and its mirrors). A file is written under a temporary
    name and renamed only once its checksum matches, so no partial or corrupt file is ever left
    under the final name."""
    ds = get_dataset(dataset)
    root.mkdir(parents=True, exist_ok=True)
    for key in keys or tuple(ds.files):
        stem, md5 = ds.files[key]
        if find_file(root, stem):
            continue
        errors = []
        for mirror in mirrors or ds.mirrors:
            url = mirror + stem + ".gz"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as r:
                    data = r.read()
            except Exception as e:  # URLError, timeouts, HTTP errors: try the next mirror
                errors.append(f"{url}: {e}")
                continue
            if _md5(data) != md5:
                errors.append(f"{url}: MD5 {_md5(data)} != {md5}, discarded")
                continue
            atomic_write_bytes(root / (stem + ".gz"), data)
            break
        else:
            raise DataError(
                f"could not download {stem}.gz ({'; '.join(errors)}); put the {ds.title} IDX files "
                f"({', '.join(s + '[.gz]' for s, _ in ds.files.values())}) into {root} or pass --data-dir"
            )


@dataclass
class ImageSplits:
    """An IDX directory's images (uint8, N x 1 x 28 x 28) and labels per split, MNIST's or
    Fashion-MNIST's. ``test`` is present only when the directory holds the t10k pair."""

    root: Path
    images: dict[str, Tensor] = field(default_factory=dict)
    labels: dict[str, Tensor] = field(default_factory=dict)

    @property
    def splits(self) -> list[str]:
        return [s for s in SPLITS if s in self.images]

    @property
    def held_out(self) -> str:
        """The split of images no run trained on or was selected by: test where present, else val."""
        return "test" if "test" in self.images else "val"

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; choose from {', '.join(SPLITS)}")
        if name not in self.images:
            raise DataError(
                f"{self.root}: the test split needs t10k-images-idx3-ubyte[.gz] and "
                f"t10k-labels-idx1-ubyte[.gz] in this directory"
            )
        return self.images[name], self.labels[name]


def check_images(images: np.ndarray, path: str | Path) -> np.ndarray:
    """``images`` if it is N x 28 x 28 (an IDX image file's layout), else a DataError naming ``path``."""
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE[1:]:
        want = " x ".join(map(str, ("N", *IMAGE_SHAPE[1:])))
        raise DataError(f"{path}: expected {want} images, header says {'x'.join(map(str, images.shape))}")
    return images


def _load_pair(root: Path, kind: str) -> tuple[np.ndarray, np.ndarray] | None:
    img_stem, lab_stem = FILES[f"{kind}-images"][0], FILES[f"{kind}-labels"][0]
    img_path, lab_path = find_file(root, img_stem), find_file(root, lab_stem)
    if img_path is None and lab_path is None:
        return None
    if img_path is None or lab_path is None:
        missing = img_stem if img_path is None else lab_stem
        raise DataError(f"{root}: {missing}[.gz] is missing (its pair is present)")
    images, labels = check_images(read_idx(img_path), img_path), read_idx(lab_path)
    if labels.ndim != 1:
        raise DataError(f"{lab_path}: expected a 1-D label file, header says {labels.ndim} dimensions")
    if len(images) != len(labels):
        raise DataError(f"{img_path}: {len(images)} images but {lab_path.name} has {len(labels)} labels")
    if len(images) == 0:
        raise DataError(f"{img_path}: holds no images")
    if labels.max() > 9:  # uint8: never below 0
        i = int(np.argmax(labels > 9))
        raise DataError(f"{lab_path}: label {int(labels[i])} at index {i} is outside 0-9")
    return images, labels


def load_idx_dir(
    data_dir: str | Path | None = None,
    split_seed: int = 42,
    val_fraction: float = 1 / 6,
    dataset: str = "mnist",
) -> ImageSplits:
    """The IDX files of ``data_dir``, whichever data set they hold (no download: the user named the
    directory), or of the cache of ``dataset`` (a DATASETS name), downloading what is missing.
    train/val are a seeded split of the training file; test is t10k."""
    get_dataset(dataset)  # a bad name is an error even when a directory makes it moot
    if data_dir is None:
        root = default_cache_dir(dataset)
        download(root, dataset=dataset)
    else:
        root = Path(data_dir)
        if not root.is_dir():
            raise DataError(f"{root}: data directory does not exist")
    train = _load_pair(root, "train")
    if train is None:
        raise DataError(
            f"{root}: no training data; expected {FILES['train-images'][0]}[.gz] and "
            f"{FILES['train-labels'][0]}[.gz] (official MNIST IDX files)"
        )
    images = torch.from_numpy(train[0].copy()).unsqueeze(1)
    labels = torch.from_numpy(train[1].copy()).long()
    n = len(images)
    n_val = int(round(n * val_fraction))
    if n - n_val < 1 or n_val < 1:
        raise DataError(f"{root}: {n} training images are too few to split into train and val")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    data = ImageSplits(root)
    data.images["train"], data.labels["train"] = images[perm[n_val:]], labels[perm[n_val:]]
    data.images["val"], data.labels["val"] = images[perm[:n_val]], labels[perm[:n_val]]
    test = _load_pair(root, "test")
    if test is not None:
        data.images["test"] = torch.from_numpy(test[0].copy()).unsqueeze(1)
        data.labels["test"] = torch.from_numpy(test[1].copy()).long()
    return data


def load_data(cfg: Config, data_dir: str | Path | None = None) -> ImageSplits:
    """A run's data: ``data_dir`` if given, else the run's own (``cfg.data_dir``, else the download
    cache of ``cfg.dataset``), split by the run's seed and fraction."""
    root = data_dir if data_dir is not None else cfg.data_dir
    return load_idx_dir(root, cfg.split_seed, cfg.val_fraction, cfg.dataset)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzipped if the name ends in .gz); used by tests and tools."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    atomic_write_bytes(path, gzip.compress(raw) if str(path).endswith(".gz") else raw)


# ----------------------------------------------------------------------------------------------
# PNG files: the user's own digits
# ----------------------------------------------------------------------------------------------


def png_files(paths: Iterable[str | Path]) -> list[Path]:
    """Each path as given, a directory replaced by its *.png files (any case; sorted by name; not
    recursive). A missing path or a directory without PNGs is a one-line DataError."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            try:
                found = sorted(f for f in p.iterdir() if f.suffix.lower() == ".png" and f.is_file())
            except OSError as e:
                raise DataError(f"{p}: cannot list this directory ({e.strerror or e})") from e
            if not found:
                raise DataError(f"{p}: no .png files in this directory")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or directory")
    return files


def _gray(im, path: Path) -> np.ndarray:
    """8-bit grayscale pixels. Palette and RGB images are converted to gray by ITU-R 601-2 luma
    (L = 0.299 R + 0.587 G + 0.114 B, Pillow's convert("L")); an alpha channel is dropped only when
    every pixel is opaque, since flattening onto a guessed background could invert a digit."""
    if im.mode in ("P", "PA") or "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("LA", "RGBA"):
        if np.asarray(im.getchannel("A")).min() < 255:
            raise DataError(f"{path}: has transparent pixels; flatten it first (MNIST digits are light on black)")
        im = im.convert(im.mode[:-1])
    if im.mode not in ("1", "L", "RGB"):
        raise DataError(f"{path}: pixel mode {im.mode} is not supported; save it as 8-bit grayscale")
    return np.asarray(im.convert("L"), dtype=np.uint8)


def _read_png(path: Path) -> np.ndarray:
    import zlib

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                raise DataError(f"{path}: a {im.format} image, not a PNG")
            if im.size[::-1] != IMAGE_SHAPE[1:]:  # PIL's size is (width, height)
                raise DataError(f"{path}: {im.size[0]}x{im.size[1]} pixels, expected 28x28")
            im.load()
            return _gray(im, path)
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a readable PNG image") from None
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read as a PNG ({str(e).strip() or type(e).__name__})") from e


def read_png_digits(paths: Iterable[str | Path]) -> Tensor:
    """Digits from PNG files (directories expand as in ``png_files``) as uint8 (N, 1, 28, 28), in
    order. Each must be a 28x28 PNG; gray, palette and RGB are accepted (see ``_gray``). Like MNIST,
    digits should be light on a dark background; nothing is inverted. Errors name the file."""
    images = [_read_png(f) for f in png_files(paths)]
    if not images:
        raise DataError("no PNG files given")
    return torch.from_numpy(np.stack(images)).unsqueeze(1)
