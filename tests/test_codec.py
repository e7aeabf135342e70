"""The codec (flowmnist.codec, `flowmnist compress / decompress`): exact round trips, the rate against the
model's bound, thread independence, one-line errors that write nothing, and refusal of layers it cannot code."""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import real_data_or_skip, synthetic_digits
from helpers import perturb
from hypothesis import given, settings
from hypothesis import strategies as st

from flowmnist import compress, decompress, flows
from flowmnist.cli import main
from flowmnist.codec import (
    DIMS,
    PRIOR_RANGE,
    CodecParams,
    chunk_sizes,
    compress_images,
    decompress_bytes,
    idx_bytes,
    read_header,
)
from flowmnist.config import FlowmnistError
from flowmnist.data import FILES, read_idx, write_idx
from flowmnist.models import build_model
from flowmnist.runs import load_pretrained

SMALL = CodecParams(batch=4, ramp=2)  # several chunk sizes within a few images


@pytest.fixture(scope="module")
def vardeq() -> torch.nn.Module:
    """A random variational-dequantization model, weights moved off their identity start."""
    torch.manual_seed(0)
    return perturb(build_model("vardeq"), 0.02).eval()


@pytest.fixture(scope="module")
def simple() -> torch.nn.Module:
    torch.manual_seed(1)
    return perturb(build_model("simple"), 0.02).eval()


def _roundtrip(model, images: np.ndarray, params: CodecParams = SMALL) -> bytes:
    data, _ = compress_images(model, images, params=params)
    original, header = decompress_bytes(data, model)
    assert original == idx_bytes(images)
    assert header.count == len(images)
    return data


def test_chunk_schedule_covers_every_image_once():
    for n in (0, 1, 7, 100, 1001):
        sizes = chunk_sizes(n, batch=32, ramp=32)
        assert sum(sizes) == n and all(1 <= b <= 32 for b in sizes)


@pytest.mark.parametrize("n", [0, 1, 23])  # empty, one image, a non-multiple of the batch
def test_roundtrip_synthetic(vardeq, n):
    _roundtrip(vardeq, synthetic_digits(n, seed=n)[0])


def test_roundtrip_uniform_dequantization_and_api(simple):
    images = synthetic_digits(9, seed=3)[0]
    back = decompress(compress(simple, images, params=SMALL), simple)
    assert back.dtype == torch.uint8 and back.shape == (9, 1, 28, 28)
    assert torch.equal(back[:, 0], torch.from_numpy(images))


def test_roundtrip_real_digits_shipped_model(real_digits):
    model = load_pretrained("multi-vardeq")
    _roundtrip(model, real_digits[:24, 0].numpy(), CodecParams())


@settings(max_examples=8, deadline=None)
@given(st.integers(1, 3), st.integers(0, 2**32 - 1), st.sampled_from([0.0, 0.5, 1.0]))
def test_property_random_images_roundtrip(simple, n, seed, dark):
    """Any pixels round-trip: uniform noise, mostly dark or all dark digits."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    images[rng.random((n, 28, 28)) < dark] = 0
    _roundtrip(simple, images)


@pytest.mark.slow
def test_rate_within_derived_margin_of_the_bound():
    """On 300 real digits, the file's bits beyond the header and the initial bits stay within the codec's
    own error budget of the single-sample bound at the noise it drew:

    * the Gaussians' floor of 2^-24 per symbol: (2 PRIOR_RANGE + 1) 2^-24 / ln 2 bits per latent element;
    * a count of noise cells pushed as 2^s x U{0..H-1}, H >= 2^10: < 2^-10 / ln 2 bits per pixel;
    * the scales P in [2^10, 2^11]: constriction's uniform models lose < 2e-5 bits per coupling element;
    * the logit grid's cells at a pixel bin's edges, which hold the noise's tails: 2^-16 wide, each holding
      about q's mass in that width; bounded here by 0.003 bits per pixel.

    The codec's bound is also checked against the model's own single-sample bpd, an independent draw:
    within 4 standard errors of their difference."""
    root = real_data_or_skip()
    images = read_idx(root / (FILES["train-images"][0] + ".gz"))[:300]
    model = load_pretrained("multi-vardeq")
    data, stats = compress_images(model, images)
    header_bits = 8 * (len(data) - 4 * read_header(data).words)
    excess = (8 * len(data) - header_bits - stats.initial_bits - stats.bound_bits) / (len(images) * DIMS)
    n_couplings = 12
    margin = (2 * PRIOR_RANGE + 1) * 2**-24 / math.log(2) + 2**-10 / math.log(2) + n_couplings * 2e-5 + 0.003
    assert -margin < excess < margin, (excess, margin)
    with torch.no_grad():
        bpd = model.bpd(torch.from_numpy(images.copy()).unsqueeze(1)).double().numpy()
    assert abs(stats.bound_bpd - bpd.mean()) < 4 * math.sqrt(2) * bpd.std() / math.sqrt(len(bpd))


def test_decoding_is_the_same_with_one_and_two_threads(vardeq):
    images = synthetic_digits(12, seed=5)[0]
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        data = compress(vardeq, images, params=SMALL)
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(decompress_bytes(data, vardeq)[0])
    finally:
        torch.set_num_threads(old)
    assert outs[0] == outs[1] == idx_bytes(images)


@pytest.fixture(scope="module")
def glow() -> torch.nn.Module:
    """multi-vardeq-glow (actnorm and 1x1 convolutions before the channel couplings), weights moved off
    their start, actnorm initialised on digits (the 1x1 convolutions start as random rotations)."""
    torch.manual_seed(2)
    model = perturb(build_model("multi-vardeq-glow"), 0.02).eval()
    with torch.no_grad():
        for f in model.flows:
            if isinstance(f, flows.InvConv1x1):
                f.log_s.add_(torch.linspace(-0.3, 0.3, len(f.log_s)))  # scales off 1, both signs kept
    model.initialize(torch.from_numpy(synthetic_digits(64, seed=9)[0]).unsqueeze(1))
    return model


def test_roundtrip_actnorm_and_invertible_1x1_convolutions(glow):
    assert any(isinstance(f, flows.InvConv1x1) and (f.sign_s < 0).any() for f in glow.flows)
    _roundtrip(glow, synthetic_digits(10, seed=4)[0])


@pytest.mark.parametrize("kind", ["actnorm", "invconv"])
def test_glow_steps_cost_their_log_determinant_and_approximate_the_layer(kind):
    """On the grid (2^-16), one actnorm or 1x1 convolution: the stream grows by -log2 |det| per image
    (to the scales' 11 bits), the output is the layer's own to those bits and a few grid cells, and the
    inverse restores the values and the stream word for word."""
    from flowmnist.codec import _actnorm_fwd, _actnorm_inv, _invconv_fwd, _invconv_inv, _Stream

    torch.manual_seed(3)
    c, delta = 4, 2.0**-16
    layer = flows.ActNorm(c) if kind == "actnorm" else flows.InvConv1x1(c)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn(p.shape) * 0.3)
    if kind == "actnorm":
        layer.initialized.fill_(True)  # these parameters, not a data-dependent start
    fwd, inv = (_actnorm_fwd, _actnorm_inv) if kind == "actnorm" else (_invconv_fwd, _invconv_inv)
    v = torch.randn(3, c, 5, 5, dtype=torch.float64)
    k = np.rint(v.numpy() / delta - 0.5).astype(np.int64)
    words = np.random.default_rng(0).integers(1, 2**32, 4000, dtype=np.uint32)
    st, ideal = _Stream(words), np.zeros(3)
    before = st.c.num_valid_bits()
    m = fwd(layer, st, k, delta, ideal)
    with torch.no_grad():
        z, ldj = layer.double()((torch.from_numpy(k).double() + 0.5) * delta)
    # the scales are coded to 11 bits (P / 2^q, P >= 2^10), the shifts to the grid
    assert (np.abs((m + 0.5) * delta - z.numpy()) <= 2.0**-10 * np.abs(z.numpy()) + 8 * delta).all()
    np.testing.assert_allclose(ideal, -ldj.numpy())
    grown = st.c.num_valid_bits() - before
    assert abs(grown - (-ldj.sum().item() / math.log(2))) < 0.002 * k.size, grown
    assert np.array_equal(inv(layer, st, m, delta), k)
    assert np.array_equal(st.words(), _Stream(words).words())


def test_refuses_a_layer_it_cannot_code(vardeq):
    """A layer without a local bits-back coding is refused in one line naming it."""
    model = build_model("multi-vardeq-mixlog")
    with pytest.raises(FlowmnistError, match="MixLogCDFCoupling"):
        compress(model, synthetic_digits(1)[0])


# --------------------------------------------------------------------------------------------------
# The commands
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> tuple[Path, Path]:
    """(an IDX file of 5 synthetic digits, its compressed file made with the shipped `simple` model)."""
    d = tmp_path_factory.mktemp("codec")
    write_idx(d / "five-idx3-ubyte.gz", synthetic_digits(5, seed=9)[0])
    assert main(["compress", "--pretrained", "simple", str(d / "five-idx3-ubyte.gz"), str(d / "five.fmz")]) == 0
    return d / "five-idx3-ubyte.gz", d / "five.fmz"


def test_cli_restores_the_idx_bytes(packed, tmp_path, capsys):
    src, fmz = packed
    assert main(["decompress", str(fmz), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out").read_bytes() == zlib.decompress(src.read_bytes(), 31)
    assert "5 images" in capsys.readouterr().out


def test_cli_decompress_names_its_model_as_compress_does(packed, tmp_path, capsys):
    """decompress [RUN_DIR] IN OUT, as compress takes [RUN_DIR] IN... OUT (--run RUN_DIR still reads)."""
    from flowmnist.runs import PRETRAINED_ROOT

    src, fmz = packed
    simple, vardeq = str(PRETRAINED_ROOT / "simple"), str(PRETRAINED_ROOT / "vardeq")
    assert main(["decompress", simple, str(fmz), str(tmp_path / "a")]) == 0
    assert main(["decompress", "--run", simple, str(fmz), str(tmp_path / "b")]) == 0
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes() == zlib.decompress(src.read_bytes(), 31)
    capsys.readouterr()
    assert main(["decompress", vardeq, str(fmz), str(tmp_path / "c")]) == 2
    assert "made with model pretrained:simple" in capsys.readouterr().err
    assert main(["decompress", "--pretrained", "simple", simple, str(fmz), str(tmp_path / "d")]) == 2
    assert "give either RUN_DIR or --pretrained NAME, not both" in capsys.readouterr().err
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_cli_png_input(tmp_path):
    from flowmnist.ood import png_encode

    images = synthetic_digits(3, seed=4)[0]
    (tmp_path / "pngs").mkdir()
    for i, img in enumerate(images):
        (tmp_path / "pngs" / f"d{i}.png").write_bytes(png_encode(img))
    assert main(["compress", "--pretrained", "simple", str(tmp_path / "pngs"), str(tmp_path / "p.fmz")]) == 0
    assert main(["decompress", str(tmp_path / "p.fmz"), str(tmp_path / "p-idx3-ubyte")]) == 0
    assert (tmp_path / "p-idx3-ubyte").read_bytes() == idx_bytes(images)


def _flip_payload_fix_crc(data: bytes) -> bytes:
    """A flipped bit in the ANS words with a recomputed CRC: only decoding itself can notice."""
    i = len(data) - 40
    body = data[:i] + bytes([data[i] ^ 16]) + data[i + 1 : -4]
    return body + struct.pack("<I", zlib.crc32(body))


def _newer_version(data: bytes) -> bytes:
    body = data[:4] + struct.pack("<H", 99) + data[6:-4]
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: d[:-100], "truncated"),
        (lambda d: d[: len(d) // 2] + bytes([d[len(d) // 2] ^ 1]) + d[len(d) // 2 + 1 :], "damaged"),
        (_flip_payload_fix_crc, "does not decode"),
        (_newer_version, "format version 99"),
        (lambda d: np.random.default_rng(0).bytes(len(d)), "not a flowmnist compressed file"),
    ],
    ids=["truncated", "flipped-byte", "flipped-byte-crc-fixed", "newer-version", "random-bytes"],
)
def test_cli_bad_files_one_line_exit_2_nothing_written(packed, tmp_path, capsys, damage, message):
    bad = tmp_path / "bad.fmz"
    bad.write_bytes(damage(packed[1].read_bytes()))
    assert main(["decompress", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_cli_wrong_model(packed, tmp_path, capsys):
    assert main(["decompress", "--pretrained", "vardeq", str(packed[1]), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "made with model pretrained:simple" in err[0]
    assert not (tmp_path / "out").exists()
