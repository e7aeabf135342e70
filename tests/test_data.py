"""Data directories of every kind (IDX under any prefix, NumPy arrays, PNG folders) and their refusals, splits,
the test split, and the checksummed download."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fashion_data_or_skip, real_data_or_skip, synthetic_digits, write_mnist_dir
from helpers import write_png

from flowmnist import data as D
from flowmnist.config import MNIST_SHAPE, Config
from flowmnist.data import (
    FILES,
    DataError,
    check_images,
    load_data,
    load_dir,
    parse_idx,
    read_idx,
    read_png_digits,
    write_idx,
)


def _idx(dims, payload=None, magic=b"\x00\x00\x08"):
    count = int(np.prod(dims))
    payload = bytes(range(256)) * (count // 256 + 1) if payload is None else payload
    return magic + bytes([len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + payload[:count]


def test_parse_valid_idx():
    arr = parse_idx(_idx((3, 2, 2)))
    assert arr.shape == (3, 2, 2) and arr.dtype == np.uint8
    assert arr.ravel().tolist() == list(range(12))


@pytest.mark.parametrize(
    "buf, message",
    [
        (b"", "too short"),
        (b"\x00\x00\x09\x03" + bytes(20), "bad magic number 0x00000903"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
        (b"\x00\x00\x08\x03\x00\x00", "truncated IDX header"),
        (_idx((10, 28, 28))[:-1], "truncated"),
        (_idx((2, 2)) + b"\x00", "trailing bytes"),
    ],
)
def test_parse_rejects_damage(buf, message):
    with pytest.raises(DataError, match=message):
        parse_idx(buf, "f.idx")


def test_read_raw_and_gzip_alike(tmp_path):
    arr = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    write_idx(tmp_path / "a", arr)
    write_idx(tmp_path / "a.gz", arr)
    assert np.array_equal(read_idx(tmp_path / "a"), arr)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), arr)


def test_bad_gzip_names_the_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(_idx((2, 28, 28)))[:-10])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: not a valid gzip file"):
        read_idx(path)


def test_splits_take_counts_from_header(tmp_path):
    root = write_mnist_dir(tmp_path, 120, gz=False)
    data = load_dir(root)
    assert data.splits == ["train", "val"]
    assert len(data.images["train"]) == 100 and len(data.images["val"]) == 20  # 5/6 : 1/6
    assert data.images["train"].dtype.is_floating_point is False
    assert tuple(data.images["train"].shape[1:]) == (1, 28, 28)
    # The split is seeded: same images each time; and train and val are disjoint and complete.
    again = load_dir(root)
    assert (again.images["val"] == data.images["val"]).all()
    all_imgs = read_idx(root / "train-images-idx3-ubyte")
    seen = {bytes(x.numpy().tobytes()) for x in [*data.images["train"], *data.images["val"]]}
    assert seen == {bytes(x.tobytes()) for x in all_imgs[:, None]}


def test_full_mnist_split_is_50k_10k(monkeypatch, tmp_path):
    """The split sizes for a 60,000-image file, without writing one: patch the reader."""
    train = D.ImageSet(np.zeros((60000, 28, 28), np.uint8), np.zeros(60000, np.int64), ("0",), tmp_path, tmp_path)
    monkeypatch.setattr(D, "read_dir", lambda root: {"train": train})
    data = load_dir(tmp_path)
    assert len(data.images["train"]) == 50000 and len(data.images["val"]) == 10000


def test_test_split_from_t10k_files(tiny_data):
    data = load_dir(tiny_data)
    assert data.splits == ["train", "val", "test"]
    images, labels = data.split("test")
    assert images.shape == (8, 1, 28, 28) and labels.shape == (8,)


def test_missing_test_split_fails_clearly(tmp_path):
    data = load_dir(write_mnist_dir(tmp_path, 60))
    with pytest.raises(DataError, match="test split needs t10k-images-idx3-ubyte"):
        data.split("test")


def test_directory_problems(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dir(tmp_path / "nope")
    with pytest.raises(DataError, match="no training data"):
        load_dir(tmp_path)
    root = write_mnist_dir(tmp_path / "d", 30)
    write_idx(root / "train-labels-idx1-ubyte.gz", np.zeros(29, np.uint8))
    with pytest.raises(DataError, match="30 images but train-labels-idx1-ubyte.gz has 29 labels"):
        load_dir(root)
    write_idx(root / "train-labels-idx1-ubyte.gz", np.zeros((30, 2), np.uint8))
    with pytest.raises(DataError, match="expected a 1-D label file"):
        load_dir(root)
    (root / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz is missing \(its pair train-images-idx3-ubyte.gz"):
        load_dir(root)


def test_real_subset_header_count(real_subset):
    data = load_dir(real_subset)
    assert len(data.images["train"]) + len(data.images["val"]) == 1200
    assert data.images["train"].float().mean() > 20  # real digits: mostly black, some ink


class _FakeResponse:
    def __init__(self, payload: bytes):
        self.payload = payload

    def read(self):
        return self.payload

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_download_verifies_md5_and_leaves_no_partial_file(tmp_path, monkeypatch):
    good = gzip.compress(_idx((1,)))
    md5 = hashlib.md5(good).hexdigest()
    monkeypatch.setitem(D.FILES, "test-labels", ("t10k-labels-idx1-ubyte", md5))
    calls = []

    def fake_urlopen(url, timeout):
        calls.append(url)
        if url.startswith("https://bad/"):
            return _FakeResponse(b"corrupt bytes")
        if url.startswith("https://down/"):
            raise OSError("connection refused")
        return _FakeResponse(good)

    monkeypatch.setattr(D.urllib.request, "urlopen", fake_urlopen)
    with pytest.raises(DataError, match="MD5 .* discarded.*pass --data-dir"):
        D.download(tmp_path, keys=("test-labels",), mirrors=("https://bad/", "https://down/"))
    assert list(tmp_path.iterdir()) == []  # nothing under the final name, no temp file left

    D.download(tmp_path, keys=("test-labels",), mirrors=("https://bad/", "https://good/"))
    assert [p.name for p in tmp_path.iterdir()] == ["t10k-labels-idx1-ubyte.gz"]
    assert (tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes() == good
    assert calls[-1] == "https://good/t10k-labels-idx1-ubyte.gz"


def test_offline_message_names_files_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWMNIST_CACHE", str(tmp_path / "cache"))

    def offline(url, timeout):
        raise OSError("network is unreachable")

    monkeypatch.setattr(D.urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as e:
        load_dir(None)
    msg = str(e.value)
    assert "train-images-idx3-ubyte" in msg and str(tmp_path / "cache" / "mnist") in msg and "--data-dir" in msg


def test_load_data_reads_the_runs_own_data_unless_given_another(tmp_path):
    own, other = write_mnist_dir(tmp_path / "own", 12, n_test=3), write_mnist_dir(tmp_path / "other", 18, seed=5)
    cfg = Config(data_dir=str(own), split_seed=1, val_fraction=0.25)
    data = load_data(cfg)
    assert data.root == own and len(data.images["val"]) == 3 and data.held_out == "test"
    assert load_data(cfg, other).root == other and load_data(cfg, other).held_out == "val"
    same = load_dir(own, 1, 0.25)
    assert torch.equal(data.images["val"], same.images["val"])  # the run's split rule, not the defaults'
    assert not torch.equal(data.images["val"], load_dir(own, 2, 0.25).images["val"])


def test_load_data_keeps_the_runs_dataset(tmp_path):
    """The dataset names what a run downloads; a directory given or not, a bad one is refused."""
    cfg = Config(data_dir=str(write_mnist_dir(tmp_path / "d", 12)), dataset="cifar")
    with pytest.raises(DataError, match="cifar"):
        load_data(cfg)


def test_check_images_names_the_file_and_shape():
    assert check_images(np.zeros((2, 28, 28), np.uint8), "f").shape == (2, 28, 28)
    assert check_images(np.zeros((2, 1, 32, 36), np.uint8), "f").shape == (2, 32, 36)
    with pytest.raises(DataError, match=r"^f: images of 30x30 pixels; height and width must be multiples of 4"):
        check_images(np.zeros((2, 30, 30), np.uint8), "f")
    with pytest.raises(DataError, match=r"^f: expected N x H x W images, header says 2x28$"):
        check_images(np.zeros((2, 28), np.uint8), "f")


def test_png_reading_gray_rgb_and_alpha(tmp_path):
    digit = synthetic_digits(1, seed=2)[0][0]
    rgb = write_png(tmp_path / "rgb.png", np.stack([digit] * 3, axis=-1))  # gray in RGB: luma = the value
    opaque = write_png(tmp_path / "opaque.png", np.dstack([digit] * 3 + [np.full_like(digit, 255)]))
    x = read_png_digits([rgb, opaque], MNIST_SHAPE)
    assert x.dtype == torch.uint8 and x.shape == (2, 1, 28, 28)
    assert np.array_equal(x[0, 0].numpy(), digit) and np.array_equal(x[1, 0].numpy(), digit)
    colour = np.zeros((28, 28, 3), np.uint8)
    colour[..., 0] = 200  # pure red -> 0.299 · 200
    assert read_png_digits([write_png(tmp_path / "red.png", colour)], MNIST_SHAPE)[0, 0, 0, 0] == 60
    see_through = np.dstack([digit] * 3 + [np.where(digit > 0, 255, 0).astype(np.uint8)])
    with pytest.raises(DataError, match="see.png: has transparent pixels"):
        read_png_digits([write_png(tmp_path / "see.png", see_through)], MNIST_SHAPE)
    with pytest.raises(DataError, match="no PNG files given"):
        read_png_digits([], MNIST_SHAPE)


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST: the registry and the download
# ----------------------------------------------------------------------------------------------


def test_fashion_mnist_debian_files():
    data = load_dir(fashion_data_or_skip())
    assert [len(data.images[s]) for s in ("train", "val", "test")] == [50000, 10000, 10000]
    train_labels = torch.cat([data.labels["train"], data.labels["val"]])
    assert torch.bincount(train_labels).tolist() == [6000] * 10
    assert torch.bincount(data.labels["test"]).tolist() == [1000] * 10
    # Fashion, not MNIST: its published mean pixel (0.2860; MNIST's is 0.1307)
    mean = torch.cat([data.images["train"], data.images["val"]]).double().mean().item() / 255
    assert mean == pytest.approx(0.2860, abs=5e-4)


def test_fashion_mnist_under_renamed_files_reads_as_under_its_own(tmp_path):
    """The Debian files linked under another prefix (as a user's download might name them) give the same
    splits: the files are found by their IDX kind and split, not by their names."""
    source = fashion_data_or_skip()
    renamed = tmp_path / "fashion"
    renamed.mkdir()
    for f in source.iterdir():
        (renamed / f"fashion-mnist-{f.name.replace('t10k', 'test')}").symlink_to(f)
    _same(load_dir(renamed), load_dir(source))


def _gz_idx_dir(root: Path, seed: int) -> dict[str, bytes]:
    """Small synthetic .gz IDX files under the official names; returns their bytes by key."""
    root.mkdir(parents=True)
    imgs, labels = synthetic_digits(12, seed)
    arrays = {"train-images": imgs, "train-labels": labels, "test-images": imgs[:4], "test-labels": labels[:4]}
    for key, arr in arrays.items():
        write_idx(root / (FILES[key][0] + ".gz"), arr)
    return {key: (root / (FILES[key][0] + ".gz")).read_bytes() for key in arrays}


def _fake_fashion(monkeypatch, tmp_path, mirrors: list[Path], good: dict[str, bytes]) -> Path:
    files = {key: (FILES[key][0], hashlib.md5(data).hexdigest()) for key, data in good.items()}
    urls = tuple(m.as_uri() + "/" for m in mirrors)
    monkeypatch.setitem(D.DATASETS, "fashion-mnist", D.Dataset("Fashion-MNIST", files, urls))
    cache = tmp_path / "cache"
    monkeypatch.setenv("FLOWMNIST_CACHE", str(cache))
    return cache


def test_fashion_download_checks_md5_into_its_own_cache(tmp_path, monkeypatch):
    good = _gz_idx_dir(tmp_path / "good", seed=1)
    _gz_idx_dir(tmp_path / "bad", seed=2)  # same names, other bytes: every MD5 mismatches
    cache = _fake_fashion(monkeypatch, tmp_path, [tmp_path / "bad", tmp_path / "good"], good)
    data = load_dir(None, dataset="fashion-mnist")
    assert data.root == cache / "fashion-mnist" and not (cache / "mnist").exists()
    assert sorted(p.name for p in data.root.iterdir()) == sorted(FILES[k][0] + ".gz" for k in good)
    assert all((data.root / (FILES[k][0] + ".gz")).read_bytes() == v for k, v in good.items())
    expect = synthetic_digits(12, 1)[0]
    got = torch.cat([data.images["train"], data.images["val"]])[:, 0].numpy()
    assert sorted(map(bytes, got)) == sorted(map(bytes, expect))


def test_fashion_download_refuses_md5_mismatch(tmp_path, monkeypatch):
    good = _gz_idx_dir(tmp_path / "good", seed=1)
    _gz_idx_dir(tmp_path / "bad", seed=2)
    cache = _fake_fashion(monkeypatch, tmp_path, [tmp_path / "bad"], good)
    with pytest.raises(DataError) as e:
        load_dir(None, dataset="fashion-mnist")
    msg = str(e.value)
    assert "MD5" in msg and "discarded" in msg and "Fashion-MNIST IDX files" in msg and "\n" not in msg
    assert list((cache / "fashion-mnist").iterdir()) == []  # nothing kept, no temporary file left


def test_dataset_names_and_cache_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWMNIST_CACHE", str(tmp_path))
    assert D.default_cache_dir() == tmp_path / "mnist"  # unchanged for MNIST
    assert D.default_cache_dir("fashion-mnist") == tmp_path / "fashion-mnist"
    assert D.DATASETS["mnist"].files is FILES and D.DATASETS["mnist"].mirrors == D.MIRRORS
    assert D.DATASETS["fashion-mnist"].files["train-images"][1] == "8d4fb7e6c68d591d4c3dfef9ec88bf0d"

    def no_network(url, timeout):
        raise AssertionError(f"no download expected, got {url}")

    monkeypatch.setattr(D.urllib.request, "urlopen", no_network)
    with pytest.raises(DataError, match=r"^unknown dataset 'cifar'; choose from mnist, fashion-mnist$"):
        load_dir(None, dataset="cifar")
    assert Config().dataset == "mnist"
    old = {k: v for k, v in Config().to_dict().items() if k != "dataset"}
    assert Config.from_dict(old).dataset == "mnist"


# ----------------------------------------------------------------------------------------------
# Any grayscale image set: IDX under any prefix, NumPy arrays, folders of PNGs
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """600 real MNIST digits as a training set and the next 120 as a test set: {split: (images, labels)}."""
    root = real_data_or_skip()
    images = read_idx(root / (FILES["train-images"][0] + ".gz"))[:720]
    labels = read_idx(root / (FILES["train-labels"][0] + ".gz"))[:720]
    return {"train": (images[:600], labels[:600]), "test": (images[600:], labels[600:])}


def _by_class(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The order a folder of class folders is read in: class by class, each in its files' (index) order."""
    order = np.argsort(labels, kind="stable")
    return images[order], labels[order]


def _idx_dir(root: Path, sets: dict, names: dict[str, str] | None = None) -> Path:
    """The sets as IDX files, under the official names or ``names`` ({key: file name})."""
    root.mkdir(parents=True)
    for split, key in (("train", "train"), ("test", "test")):
        for part, array in zip(("images", "labels"), sets[split], strict=True):
            name = (names or {}).get(f"{key}-{part}") or FILES[f"{key}-{part}"][0] + ".gz"
            write_idx(root / name, array)
    return root


def _png_dir(root: Path, sets: dict) -> Path:
    """train/ and test/, each a folder per digit of PNGs named by their index."""
    for split, (images, labels) in sets.items():
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            (root / split / str(label)).mkdir(parents=True, exist_ok=True)
            write_png(root / split / str(label) / f"{i:05d}.png", image)
    return root


def _same(a: D.ImageSplits, b: D.ImageSplits) -> None:
    assert a.splits == b.splits == ["train", "val", "test"] and a.classes == b.classes and a.shape == b.shape
    for split in a.splits:
        assert torch.equal(a.images[split], b.images[split]) and torch.equal(a.labels[split], b.labels[split])


def test_png_class_folders_read_as_the_idx_of_the_same_digits(digits, tmp_path):
    ordered = {split: _by_class(*pair) for split, pair in digits.items()}
    reference = load_dir(_idx_dir(tmp_path / "idx", ordered))
    data = load_dir(_png_dir(tmp_path / "png", digits))
    _same(data, reference)
    assert data.classes == tuple("0123456789") and data.shape == (1, 28, 28)
    assert data.label_files == {"train": tmp_path / "png" / "train", "test": tmp_path / "png" / "test"}


def test_png_class_folders_give_the_bpd_of_the_idx_of_the_same_digits(digits, tmp_path, capsys):
    """`flowmnist evaluate` of a shipped model on the digits as PNG class folders and as IDX files: the same
    bpd for every split (the same images in the same splits, the same noise)."""
    import json

    from flowmnist.cli import main

    ordered = {split: _by_class(*pair) for split, pair in digits.items()}
    bpd = {}
    for kind, root in (("idx", _idx_dir(tmp_path / "idx", ordered)), ("png", _png_dir(tmp_path / "png", digits))):
        args = ["--data-dir", str(root), "--max-images", "16", "--importance-samples", "2", "--timing-reps", "1"]
        assert main(["evaluate", "--pretrained", "simple", *args, "--json"]) == 0
        bpd[kind] = json.loads(capsys.readouterr().out)["bpd"]
    assert bpd["png"] == bpd["idx"] and set(bpd["png"]) == {"train", "val", "test"} and 0.5 < bpd["png"]["val"] < 2


def test_npz_npy_and_renamed_idx_read_as_the_idx_of_the_same_digits(digits, tmp_path):
    reference = load_dir(_idx_dir(tmp_path / "idx", digits))
    emnist = {f"{k}-{p}": f"emnist-digits-{k}-{p}-idx{3 if p == 'images' else 1}-ubyte" for k in ("train", "test")
              for p in ("images", "labels")}  # fmt: skip
    _same(load_dir(_idx_dir(tmp_path / "emnist", digits, emnist)), reference)
    kmnist = tmp_path / "kmnist"  # KMNIST's own layout: one array (arr_0) per .npz file
    kmnist.mkdir()
    for split, (images, labels) in digits.items():
        np.savez_compressed(kmnist / f"kmnist-{split}-imgs.npz", images)
        np.savez_compressed(kmnist / f"kmnist-{split}-labels.npz", labels)
    _same(load_dir(kmnist), reference)
    keras = tmp_path / "keras"  # one .npz of x_train, y_train, x_test, y_test
    keras.mkdir()
    np.savez(keras / "mnist.npz", x_train=digits["train"][0], y_train=digits["train"][1].astype(np.int64),
             x_test=digits["test"][0], y_test=digits["test"][1])  # fmt: skip
    _same(load_dir(keras), reference)
    npy = tmp_path / "npy"  # N x 1 x H x W images: the channel is dropped
    npy.mkdir()
    for split, (images, labels) in digits.items():
        np.save(npy / f"{split}_images.npy", images[:, None])
        np.save(npy / f"{split}_labels.npy", labels.astype(np.int32))
    _same(load_dir(npy), reference)


def test_fashion_mnist_under_renamed_files(tmp_path):
    official = fashion_data_or_skip()
    renamed = tmp_path / "fashion"
    renamed.mkdir()
    for stem, _ in D.FASHION_FILES.values():
        (renamed / f"fashion-{stem}.gz").write_bytes((official / f"{stem}.gz").read_bytes())
    _same(load_dir(renamed), load_dir(official))


def test_flat_folder_is_unlabelled_and_other_sizes_are_read(tmp_path):
    images = np.pad(synthetic_digits(12, seed=3)[0], ((0, 0), (2, 2), (2, 2)))  # 32x32, as Bit-Swap pads MNIST
    for i, image in enumerate(images):
        write_png(tmp_path / f"digit{i:02d}.png", image)
    data = load_dir(tmp_path, val_fraction=0.25)
    assert data.shape == (1, 32, 32) and data.classes == () and data.splits == ["train", "val"]
    assert (data.labels["train"] == D.NO_LABEL).all() and len(data.labels["val"]) == 3
    got = torch.cat([data.images["train"], data.images["val"]])[:, 0].numpy()
    assert sorted(map(bytes, got)) == sorted(map(bytes, images))
    assert load_data(Config(data_dir=str(tmp_path), image_shape=(1, 32, 32))).shape == (1, 32, 32)
    with pytest.raises(DataError, match=r"^\S+: images of 32x32 pixels, the model's are 28x28; use a model"):
        load_data(Config(data_dir=str(tmp_path)))  # a model of MNIST's size
    assert load_data(Config(data_dir=str(tmp_path)), fit=False).shape == (1, 32, 32)  # what training reads


def test_class_folders_in_name_order_numbers_by_value(tmp_path):
    digit = synthetic_digits(1)[0][0]
    for folder in ("a/dog", "a/cat", "a/bird", "b/10", "b/9", "b/1"):
        (tmp_path / folder).mkdir(parents=True)
        write_png(tmp_path / folder / "1.png", digit)
        write_png(tmp_path / folder / "2.png", digit)
    assert load_dir(tmp_path / "a").classes == ("bird", "cat", "dog")
    data = load_dir(tmp_path / "b")
    assert data.classes == ("1", "9", "10")
    assert sorted(torch.cat([data.labels["train"], data.labels["val"]]).tolist()) == [0, 0, 1, 1, 2, 2]


def _bad_folder(root: Path, case: str) -> Path:
    """A data folder with one thing wrong (``case``); returns the path the error must name."""
    digits, labels = synthetic_digits(6, seed=1)
    root.mkdir()
    for i in range(len(digits)):
        (root / str(i)).mkdir()
    pngs = [write_png(root / str(i) / "a.png", d) for i, d in enumerate(digits)]
    if case == "mixed-sizes":
        return write_png(root / "3" / "b.png", np.zeros((32, 32), np.uint8))
    if case == "colour":
        return write_png(root / "4" / "b.png", np.dstack([digits[0], digits[0] // 2, digits[0]]))
    if case == "16-bit":
        return write_png(root / "4" / "b.png", digits[0].astype(np.uint16) * 257)
    if case == "not-divisible-by-4":
        for p in pngs:
            write_png(p, np.zeros((30, 30), np.uint8))
        return pngs[0]
    if case == "unreadable":
        (root / "2" / "b.png").write_bytes(pngs[2].read_bytes()[:60])
        return root / "2" / "b.png"
    if case == "not-a-png":
        (root / "5" / "notes.txt").write_text("a note\n")
        return root / "5" / "notes.txt"
    if case == "empty-class":
        (root / "9").mkdir()
        return root / "9"
    if case == "empty":
        for p in pngs:
            p.unlink()
            p.parent.rmdir()
        return root
    for p in pngs:  # the rest are NumPy cases
        p.unlink()
        p.parent.rmdir()
    if case == "float-pixels":
        np.save(root / "train-images.npy", digits.astype(np.float32) / 255)
        np.save(root / "train-labels.npy", labels)
        return root / "train-images.npy"
    if case == "colour-array":
        np.save(root / "train-images.npy", np.stack([digits] * 3, axis=-1))
        np.save(root / "train-labels.npy", labels)
        return root / "train-images.npy"
    if case == "two-sets":
        for name in ("letters", "digits"):
            write_idx(root / f"emnist-{name}-train-images-idx3-ubyte.gz", digits)
            write_idx(root / f"emnist-{name}-train-labels-idx1-ubyte.gz", labels)
        return root
    if case == "unnamed-array":
        np.save(root / "digits.npy", digits)
        return root / "digits.npy"
    raise AssertionError(case)


BAD_FOLDERS = {
    "mixed-sizes": "32x32 pixels, but a.png is 28x28; every image needs the same size",
    "colour": "a colour image; flowmnist reads 8-bit grayscale",
    "16-bit": "pixel mode I;16 is not supported",
    "not-divisible-by-4": "images of 30x30 pixels; height and width must be multiples of 4",
    "unreadable": "cannot read as a PNG",
    "not-a-png": "not a readable PNG image",
    "empty-class": "empty class folder, no PNG images",
    "empty": "no training data; expected IDX files",
    "float-pixels": "pixels of type float32; flowmnist reads 8-bit grayscale",
    "colour-array": "colour images (6x28x28x3)",
    "two-sets": "2 train images files (emnist-digits-train-images-idx3-ubyte.gz, emnist-letters-",
    "unnamed-array": "the name does not tell images from labels",
}


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_bad_folders_are_refused_in_one_line_naming_the_file(tmp_path, capsys, case):
    from flowmnist.cli import main

    named = _bad_folder(tmp_path / "data", case)
    with pytest.raises(DataError) as e:
        load_dir(tmp_path / "data")
    assert str(e.value).startswith(f"{named}: ") and BAD_FOLDERS[case] in str(e.value) and "\n" not in str(e.value)
    run = tmp_path / "run"
    assert main(["train", "--model", "simple", "--data-dir", str(tmp_path / "data"), "--out", str(run)]) == 2
    assert capsys.readouterr().err.strip() == f"flowmnist train: error: {e.value}"
    assert not run.exists()  # nothing written


def test_train_refuses_unlabelled_conditional_runs(tmp_path, capsys):
    from flowmnist.cli import main

    (tmp_path / "flat").mkdir()
    for i, image in enumerate(synthetic_digits(12)[0]):
        write_png(tmp_path / "flat" / f"{i}.png", image)
    run = tmp_path / "run"
    args = ["train", "--model", "simple", "--out", str(run), "--data-dir"]
    assert main([*args, str(tmp_path / "flat"), "--conditional"]) == 2
    assert "unlabelled images; a conditional model needs labels" in capsys.readouterr().err
    assert not run.exists()
