"""Image data: MNIST and Fashion-MNIST by checksummed download, and any 8-bit grayscale set in a
directory (IDX files under any prefix, NumPy .npy/.npz arrays, folders of PNGs); validation with one-line
errors naming the file, seeded splits, in-memory batches.

Images stay in memory as uint8 tensors (N, 1, H, W) with values 0..255: MNIST is 47 MB at most,
so there is no DataLoader and no worker overhead.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import re
import struct
import urllib.request
import zipfile
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


# The datasets `load_dir` can download by name (a data directory is read whatever it holds).
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


# ----------------------------------------------------------------------------------------------
# A data directory: IDX files, NumPy arrays or folders of PNGs
# ----------------------------------------------------------------------------------------------

NO_LABEL = -1  # the label of every image of an unlabelled set (a flat folder of PNGs)
ARRAY_FILE = re.compile(r"(idx\d[-.]ubyte(\.gz)?|\.npy|\.npz)$", re.IGNORECASE)
# An array's role and split come from the words of its name: "emnist-letters-train-images-idx3-ubyte",
# "kmnist-test-labels.npz", the keys x_train / y_test of Keras's mnist.npz. No test word: training data.
IMAGE_WORDS = {"images", "image", "imgs", "img", "x"}
LABEL_WORDS = {"labels", "label", "targets", "y"}
TEST_WORDS = {"test", "testing", "t10k"}
SPLIT_FOLDERS = {"train": "train", "training": "train", "test": "test", "testing": "test"}
NO_TRAINING_DATA = (
    "no training data; expected IDX files (train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz], any "
    "prefix), NumPy arrays (train images and labels, .npy or .npz) or PNG images (a folder per class, or flat)"
)


class _Array(NamedTuple):
    """One array of a data directory: an IDX or .npy file, an .npz holding one array, or one key of an .npz."""

    path: Path
    key: str | None  # the .npz key, None for IDX and .npy
    role: str  # "images" or "labels"
    split: str  # "train" or "test"
    name: str  # for messages: the path, with [key] when the .npz holds several arrays


class ImageSet(NamedTuple):
    """One split of a directory as read: uint8 images (N, H, W), int64 labels or None (unlabelled)."""

    images: np.ndarray
    labels: np.ndarray | None
    classes: tuple[str, ...]  # each label's name; () for unlabelled images
    source: Path  # the image file or folder
    label_source: Path | None


def _words(name: str) -> set[str]:
    return set(re.split(r"[^a-z0-9]+", name.lower()))


def _classify(path: Path, key: str | None, words: set[str], name: str) -> _Array:
    roles = [role for role, ws in (("images", IMAGE_WORDS), ("labels", LABEL_WORDS)) if words & ws]
    if len(roles) != 1:
        raise DataError(f"{name}: the name does not tell images from labels (e.g. train-images.npy, train-labels.npy)")
    return _Array(path, key, roles[0], "test" if words & TEST_WORDS else "train", name)


def _npz_keys(path: Path) -> list[str]:
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: cannot read as a NumPy .npz file ({e})") from e
    if not keys:
        raise DataError(f"{path}: holds no arrays")
    return keys


def _arrays(root: Path) -> list[_Array]:
    """The IDX, .npy and .npz files of ``root`` (not recursive), each array with its role and split."""
    out = []
    for f in _visible(root):
        if not ARRAY_FILE.search(f.name) or not f.is_file():
            continue
        stem = _words(re.sub(r"\.(gz|npy|npz)$", "", f.name, flags=re.IGNORECASE))
        if f.suffix.lower() != ".npz":
            out.append(_classify(f, None, stem, str(f)))
            continue
        keys = _npz_keys(f)
        if len(keys) == 1:  # KMNIST's kmnist-train-imgs.npz: arr_0, named by the file
            out.append(_classify(f, keys[0], stem, str(f)))
        else:  # Keras's mnist.npz: x_train, y_train, x_test, y_test
            out += [_classify(f, k, stem | _words(k), f"{f}[{k}]") for k in keys]
    return out


def _pick(arrays: list[_Array], split: str, role: str, root: Path) -> _Array | None:
    """The one array of ``split`` and ``role``; a raw IDX file wins over its .gz twin (gunzip -k)."""
    found = [a for a in arrays if (a.split, a.role) == (split, role)]
    raw = {a.path for a in found}
    found = [a for a in found if not (a.path.suffix == ".gz" and a.path.with_suffix("") in raw)]
    if len(found) > 1:
        names = ", ".join(Path(a.name).name for a in found)
        raise DataError(f"{root}: {len(found)} {split} {role} files ({names}); keep one data set per directory")
    return found[0] if found else None


def _partner(name: str) -> str:
    """The name a file's missing pair most likely has: train-images-idx3-ubyte -> train-labels-idx1-ubyte."""
    swap = {"images": "labels", "imgs": "labels", "labels": "images", "idx3": "idx1", "idx1": "idx3"}
    swap |= {"x": "y", "y": "x"}
    return re.sub(r"[A-Za-z0-9]+", lambda m: swap.get(m.group(0).lower(), m.group(0)), name)


def _load_array(a: _Array) -> np.ndarray:
    if a.path.suffix.lower() not in (".npy", ".npz"):
        return read_idx(a.path)
    try:
        if a.key is None:
            return np.load(a.path, allow_pickle=False)
        with np.load(a.path, allow_pickle=False) as z:
            return z[a.key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{a.name}: cannot read as a NumPy array ({e})") from e


def check_images(images: np.ndarray, path: str | Path) -> np.ndarray:
    """``images`` as uint8 N x H x W (a single channel, N x 1 x H x W or N x H x W x 1, is dropped), else a
    DataError naming ``path``: 8-bit grayscale, N >= 1, height and width multiples of 4 (every
    architecture squeezes 2 x 2 twice)."""
    shape = "x".join(map(str, images.shape))
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    elif images.ndim == 4 and images.shape[3] == 1:
        images = images[..., 0]
    elif images.ndim == 4 and (images.shape[1] in (3, 4) or images.shape[3] in (3, 4)):
        raise DataError(f"{path}: colour images ({shape}); flowmnist reads 8-bit grayscale")
    if images.ndim != 3:
        raise DataError(f"{path}: expected N x H x W images, header says {shape}")
    if images.dtype != np.uint8:
        raise DataError(f"{path}: pixels of type {images.dtype}; flowmnist reads 8-bit grayscale (uint8, 0-255)")
    h, w = images.shape[1:]
    if h == 0 or w == 0 or h % 4 or w % 4:
        raise DataError(f"{path}: images of {w}x{h} pixels; height and width must be multiples of 4 (two 2x2 squeezes)")
    if len(images) == 0:
        raise DataError(f"{path}: holds no images")
    return images


def _check_labels(labels: np.ndarray, path: str, n: int, images: str) -> np.ndarray:
    if labels.ndim != 1:
        raise DataError(f"{path}: expected a 1-D label file, it has {labels.ndim} dimensions")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: labels of type {labels.dtype}; expected integers")
    if len(labels) != n:
        raise DataError(f"{images}: {n} images but {Path(path).name} has {len(labels)} labels")
    if len(labels) and labels.min() < 0:
        i = int(np.argmax(labels < 0))
        raise DataError(f"{path}: label {int(labels[i])} at index {i} is negative")
    return labels.astype(np.int64)


def _read_arrays(root: Path, arrays: list[_Array]) -> dict[str, ImageSet]:
    """The image/label pairs of each split; labels name their classes by number (0 .. the largest)."""
    sets = {}
    for split in ("train", "test"):
        img, lab = _pick(arrays, split, "images", root), _pick(arrays, split, "labels", root)
        if img is None and lab is None:
            continue
        if img is None or lab is None:
            have = Path((img or lab).name).name
            raise DataError(f"{root}: {_partner(have)} is missing (its pair {have} is present)")
        images = check_images(_load_array(img), img.name)
        labels = _check_labels(_load_array(lab), lab.name, len(images), img.name)
        sets[split] = ImageSet(images, labels, (), img.path, lab.path)
    top = max((int(s.labels.max()) for s in sets.values()), default=-1)
    return {k: s._replace(classes=tuple(map(str, range(top + 1)))) for k, s in sets.items()}


def _visible(folder: Path) -> list[Path]:
    """A folder's entries by name, hidden ones (.DS_Store, .ipynb_checkpoints) left out."""
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as e:
        raise DataError(f"{folder}: cannot list this folder ({e.strerror or e})") from e


def _png_stack(files: list[Path]) -> np.ndarray:
    """Every file a grayscale PNG of one size, else a DataError naming the first that is not."""
    images = []
    for f in files:
        x = _read_png(f, colour=False)
        if images and x.shape != images[0].shape:
            (h, w), (h0, w0) = x.shape, images[0].shape
            raise DataError(f"{f}: {w}x{h} pixels, but {files[0].name} is {w0}x{h0}; every image needs the same size")
        images.append(x)
    return check_images(np.stack(images), files[0])


def _png_folder(folder: Path) -> ImageSet:
    """One split's PNGs: a folder of class folders (labels: the classes' indices in name order, numeric
    when every name is a number) or a flat folder (unlabelled). Every visible file must be a PNG."""
    entries = _visible(folder)
    if not entries:
        raise DataError(f"{folder}: empty folder, no PNG images")
    if not any(e.is_dir() for e in entries):
        images = _png_stack(entries)
        return ImageSet(images, None, (), folder, None)
    stray = next((e for e in entries if not e.is_dir()), None)
    if stray is not None:
        raise DataError(f"{stray}: a file beside the class folders; every image goes in its class's folder")
    names = [e.name for e in entries]
    classes = tuple(sorted(names, key=int) if all(n.isdigit() for n in names) else names)
    files, labels = [], []
    for i, name in enumerate(classes):
        inner = _visible(folder / name)
        if not inner:
            raise DataError(f"{folder / name}: empty class folder, no PNG images")
        nested = next((e for e in inner if e.is_dir()), None)
        if nested is not None:
            raise DataError(f"{nested}: a folder inside a class folder; a class folder holds PNG files only")
        files += inner
        labels += [i] * len(inner)
    return ImageSet(_png_stack(files), np.array(labels, np.int64), classes, folder, folder)


def _png_folders(root: Path) -> dict[str, ImageSet]:
    """``root`` as one training folder, or its train/ and test/ folders (training/ and testing/ too)."""
    entries = _visible(root)
    splits = [e for e in entries if e.is_dir() and e.name.lower() in SPLIT_FOLDERS]
    if not splits or any(e.is_dir() and e not in splits for e in entries):
        return {"train": _png_folder(root)}
    stray = next((e for e in entries if not e.is_dir()), None)
    if stray is not None:
        raise DataError(f"{stray}: a file beside the {' and '.join(e.name for e in splits)} folders")
    by_split = {}
    for e in splits:
        split = SPLIT_FOLDERS[e.name.lower()]
        if split in by_split:
            raise DataError(f"{root}: two {split} folders, {by_split[split].name} and {e.name}; keep one")
        by_split[split] = e
    return {split: _png_folder(folder) for split, folder in by_split.items()}


def read_dir(root: Path) -> dict[str, ImageSet]:
    """A data directory's files, whatever they hold: IDX files or NumPy arrays if there are any, else
    PNGs; the training set and, where present, the test set, checked to agree in size and classes."""
    arrays = _arrays(root)
    if arrays:
        sets = _read_arrays(root, arrays)
    elif any(e.is_dir() or e.suffix.lower() == ".png" for e in _visible(root)):
        sets = _png_folders(root)
    else:
        sets = {}
    if "train" not in sets:
        raise DataError(f"{root}: {NO_TRAINING_DATA}")
    train, test = sets["train"], sets.get("test")
    if test is not None and test.images.shape[1:] != train.images.shape[1:]:
        (h, w), (h0, w0) = test.images.shape[1:], train.images.shape[1:]
        raise DataError(f"{test.source}: test images of {w}x{h} pixels, the training images {w0}x{h0}")
    if test is not None and test.classes != train.classes:
        what = ", ".join(test.classes) or "none, a flat folder"
        raise DataError(f"{test.source}: classes ({what}) differ from the training set's ({', '.join(train.classes)})")
    return sets


@dataclass
class ImageSplits:
    """A data directory's images (uint8, N x 1 x H x W) and labels (int64; NO_LABEL throughout for an
    unlabelled set) per split. ``test`` is present only when the directory holds test images.
    ``classes`` names each label (a class folder's name, else the number); empty when unlabelled.
    ``label_files``: where the training and test labels were read, for messages."""

    root: Path
    images: dict[str, Tensor] = field(default_factory=dict)
    labels: dict[str, Tensor] = field(default_factory=dict)
    classes: tuple[str, ...] = ()
    label_files: dict[str, Path] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        """(channels, height, width) of every image."""
        return tuple(self.images["train"].shape[1:])

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
                f"{self.root}: the test split needs t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz] "
                f"(or test image and label files of another name, or a test/ folder of PNGs) in this directory"
            )
        return self.images[name], self.labels[name]


def _tensors(s: ImageSet) -> tuple[Tensor, Tensor]:
    labels = s.labels if s.labels is not None else np.full(len(s.images), NO_LABEL, np.int64)
    return torch.from_numpy(s.images.copy()).unsqueeze(1), torch.from_numpy(labels.copy())


def load_dir(
    data_dir: str | Path | None = None,
    split_seed: int = 42,
    val_fraction: float = 1 / 6,
    dataset: str = "mnist",
) -> ImageSplits:
    """The images of ``data_dir``, whatever they hold (``read_dir``; no download: the user named the
    directory), or the IDX files of the cache of ``dataset`` (a DATASETS name), downloading what is
    missing. train/val are a seeded split of the training set; test is the test set (t10k)."""
    get_dataset(dataset)  # a bad name is an error even when a directory makes it moot
    if data_dir is None:
        root = default_cache_dir(dataset)
        download(root, dataset=dataset)
    else:
        root = Path(data_dir)
        if not root.is_dir():
            raise DataError(f"{root}: data directory does not exist")
    sets = read_dir(root)
    images, labels = _tensors(sets["train"])
    n = len(images)
    n_val = int(round(n * val_fraction))
    if n - n_val < 1 or n_val < 1:
        raise DataError(f"{root}: {n} training images are too few to split into train and val")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    data = ImageSplits(root, classes=sets["train"].classes)
    data.images["train"], data.labels["train"] = images[perm[n_val:]], labels[perm[n_val:]]
    data.images["val"], data.labels["val"] = images[perm[:n_val]], labels[perm[:n_val]]
    if "test" in sets:
        data.images["test"], data.labels["test"] = _tensors(sets["test"])
    data.label_files = {k: s.label_source for k, s in sets.items() if s.label_source is not None}
    return data


def load_data(cfg: Config, data_dir: str | Path | None = None, *, fit: bool = True) -> ImageSplits:
    """A run's data: ``data_dir`` if given, else the run's own (``cfg.data_dir``, else the download cache
    of ``cfg.dataset``), split by the run's seed and fraction. With ``fit`` (every command that feeds
    the images to the run's model) images of another size than the model's (``cfg.image_shape``) are
    refused; training reads any size (``fit=False``) and builds its model for it."""
    root = data_dir if data_dir is not None else cfg.data_dir
    data = load_dir(root, cfg.split_seed, cfg.val_fraction, cfg.dataset)
    if fit:
        check_fit(data.shape, cfg.image_shape, data.root)
    return data


def size_text(shape: tuple[int, ...]) -> str:
    """An image shape (..., H, W) as a size in words: "28x28" (width x height)."""
    return f"{shape[-1]}x{shape[-2]}"


def check_fit(shape: tuple[int, ...], model_shape: tuple[int, ...], source: str | Path) -> None:
    """Images of ``shape`` (..., H, W) fed to a model built for ``model_shape``: the same size, else one
    line naming ``source`` and both sizes."""
    if tuple(shape[-2:]) != tuple(model_shape[-2:]):
        raise DataError(
            f"{source}: images of {size_text(shape)} pixels, the model's are {size_text(model_shape)}; "
            "use a model trained on images of this size"
        )


def check_classes(data: ImageSplits, num_classes: int) -> None:
    """A conditional model's data: labelled, two or more classes, every label below the model's
    ``num_classes``, every class in the training split."""
    if not data.classes:
        raise DataError(f"{data.root}: unlabelled images; a conditional model needs labels (a folder per class)")
    if len(data.classes) < 2:
        raise DataError(f"{data.root}: one class ({data.classes[0]}); a conditional model needs two or more")
    every = {"train": torch.cat([data.labels["train"], data.labels["val"]]), "test": data.labels.get("test")}
    for split, labels in every.items():
        if labels is not None and int(labels.max()) >= num_classes:
            where = data.label_files[split]
            raise DataError(
                f"{where}: label {int(labels.max())} is outside 0-{num_classes - 1}, the classes of a conditional model"
            )
    counts = torch.bincount(data.labels["train"].long(), minlength=num_classes)
    if not bool(counts.all()):  # p(y) = 0 for a class the model never sees
        empty = data.classes[int((counts == 0).nonzero()[0])]
        raise DataError(
            f"{data.label_files['train']}: no training images of class {empty} (of {num_classes}); "
            "a conditional model needs every class in its training set"
        )


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


def _gray(im, path: Path, colour: bool = True) -> np.ndarray:
    """8-bit grayscale pixels. Palette and RGB images are converted to gray by ITU-R 601-2 luma
    (L = 0.299 R + 0.587 G + 0.114 B, Pillow's convert("L")), or with ``colour=False`` accepted only when
    every pixel is gray (R = G = B); an alpha channel is dropped only when every pixel is opaque, since
    flattening onto a guessed background could invert a digit."""
    if im.mode in ("P", "PA") or "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("LA", "RGBA"):
        if np.asarray(im.getchannel("A")).min() < 255:
            raise DataError(f"{path}: has transparent pixels; flatten it first (MNIST digits are light on black)")
        im = im.convert(im.mode[:-1])
    if im.mode not in ("1", "L", "RGB"):
        raise DataError(f"{path}: pixel mode {im.mode} is not supported; save it as 8-bit grayscale")
    if im.mode == "RGB" and not colour:
        rgb = np.asarray(im)
        if (rgb != rgb[..., :1]).any():
            raise DataError(f"{path}: a colour image; flowmnist reads 8-bit grayscale (convert it to gray first)")
        return np.ascontiguousarray(rgb[..., 0])
    return np.asarray(im.convert("L"), dtype=np.uint8)


def _read_png(path: Path, colour: bool = True) -> np.ndarray:
    """A PNG file's pixels, uint8 (H, W), by ``_gray``; any other file is a DataError naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                raise DataError(f"{path}: a {im.format} image, not a PNG")
            im.load()
            return _gray(im, path, colour)
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a readable PNG image") from None
    except IsADirectoryError:
        raise DataError(f"{path}: a folder, expected a PNG file") from None
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read as a PNG ({str(e).strip() or type(e).__name__})") from e


def read_png_digits(paths: Iterable[str | Path], shape: tuple[int, ...]) -> Tensor:
    """Digits from PNG files (directories expand as in ``png_files``) as uint8 (N, 1, H, W), in order.
    Each must be a PNG of the model's ``shape`` (..., H, W) (``check_fit``); gray, palette and RGB are
    accepted (see ``_gray``). Like MNIST, digits should be light on a dark background; nothing is
    inverted. Errors name the file."""
    images = []
    for f in png_files(paths):
        x = _read_png(f)
        check_fit(x.shape, shape, f)
        images.append(x)
    if not images:
        raise DataError("no PNG files given")
    return torch.from_numpy(np.stack(images)).unsqueeze(1)
