"""The codec (flowmnist.codec, `flowmnist compress / decompress`): exact round trips, the rate against the
model's bound, portability (a committed golden file, every CPU capability and thread count, format-1 files),
the integer layers against plain Python integers, each layer coder's stream growth against its
log-determinant, one-line errors that write nothing, and refusal of layers it cannot code."""

from __future__ import annotations

import hashlib
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REAL_DATA, has_real_data, real_data_or_skip, synthetic_digits
from helpers import perturb
from hypothesis import given, settings
from hypothesis import strategies as st

from flowmnist import compress, decompress, flows
from flowmnist.cli import main
from flowmnist.codec import (
    PRIOR_RANGE,
    CodecParams,
    chunk_sizes,
    compress_images,
    decompress_bytes,
    default_streams,
    idx_bytes,
    intnet,
    read_header,
    stream_sizes,
)
from flowmnist.config import FlowmnistError, PriorSpec
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


def test_the_header_records_the_image_shape_which_decompress_checks(simple):
    """A model of 32x32 images codes 32x32 images and the file says so; a model of another size is refused
    in one line before decoding; a file written before the shape was recorded (the golden file) holds 28x28."""
    torch.manual_seed(2)
    model = perturb(build_model("vardeq", image_shape=(1, 32, 32)), 0.02).eval()
    images = np.pad(synthetic_digits(3, seed=15)[0], ((0, 0), (2, 2), (2, 2)))
    data = compress(model, images, params=SMALL)
    assert read_header(data).shape == (1, 32, 32)
    assert torch.equal(decompress(data, model), torch.from_numpy(images).unsqueeze(1))
    with pytest.raises(FlowmnistError, match=r"^<bytes>: holds images of 32x32 pixels, the model given codes 28x28$"):
        decompress(data, simple)
    with pytest.raises(FlowmnistError, match=r"^codec: expected N x 32 x 32 images \(the model's size\), got shape"):
        compress(model, images[:, 2:-2, 2:-2])
    assert b'"shape"' not in GOLDEN.read_bytes() and read_header(GOLDEN.read_bytes()).shape == (1, 28, 28)


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


# --------------------------------------------------------------------------------------------------
# Format 3: independent streams, coded side by side
# --------------------------------------------------------------------------------------------------


def test_default_streams_depend_on_the_image_count_alone():
    assert [default_streams(n) for n in (0, 1, 1999, 2000, 10000, 10**6)] == [1, 1, 1, 2, 2, 2]
    assert stream_sizes(7, 3) == [3, 2, 2] and stream_sizes(0, 1) == [0]


@pytest.fixture(scope="module")
def two_streams(simple) -> tuple[np.ndarray, bytes]:
    images = synthetic_digits(25, seed=21)[0]
    return images, compress_images(simple, images, params=SMALL, streams=2)[0]


@pytest.mark.parametrize("streams", [2, 3])
def test_streams_roundtrip_with_one_worker(simple, streams, two_streams):
    """A file of S streams: each stream's images and words in the header, and one worker decodes it."""
    images = two_streams[0]
    data = two_streams[1] if streams == 2 else compress_images(simple, images, params=SMALL, streams=streams)[0]
    header = read_header(data)
    assert header.version == 3 and [p[0] for p in header.parts()] == stream_sizes(25, streams)
    assert sum(p[2] for p in header.parts()) == header.words
    original, _ = decompress_bytes(data, simple, workers=1)
    assert original == idx_bytes(images)


def test_streams_coded_by_worker_processes_give_the_same_file(simple, two_streams):
    """Two worker processes write the very file one process wrote, and decode it; progress counts every
    image."""
    images, data = two_streams
    done = []
    again, _ = compress_images(simple, images, params=SMALL, streams=2, workers=2, progress=done.append)
    assert again == data and sum(done) == len(images)
    original, _ = decompress_bytes(data, simple, workers=2)
    assert original == idx_bytes(images)


def _edit_meta(data: bytes, edit) -> bytes:
    """The file with its JSON header edited by ``edit(meta)`` and its CRC-32 made to hold again."""
    import json

    n = struct.unpack("<I", data[6:10])[0]
    meta = json.loads(data[10 : 10 + n])
    edit(meta)
    blob = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    body = data[:6] + struct.pack("<I", len(blob)) + blob + data[10 + n : -4]
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d, h: d[: len(d) - 4 * h.parts()[1][2] // 2], "truncated"),
        (lambda d, h: _edit_meta(d, lambda m: m["streams"][0].__setitem__(2, m["streams"][0][2] - 1)), "streams"),
        (lambda d, h: _edit_meta(d, lambda m: m["streams"].pop()), "streams"),
        (lambda d, h: _edit_meta(d, lambda m: m["streams"][0].__setitem__(0, 14)), "streams"),
    ],
    ids=["truncated-in-stream-2", "words-disagree", "a-stream-missing", "images-disagree"],
)
def test_format_3_damage_refused_in_one_line(simple, two_streams, damage, message):
    data = two_streams[1]
    with pytest.raises(FlowmnistError, match=message) as e:
        decompress_bytes(damage(data, read_header(data)), simple, name="f.fmz")
    assert "\n" not in str(e.value) and str(e.value).startswith("f.fmz: ")


def test_more_streams_than_format_or_images_allow(simple):
    images = synthetic_digits(3, seed=2)[0]
    for streams, version in ((4, 3), (0, 3), (2, 2)):
        with pytest.raises(FlowmnistError, match="streams"):
            compress_images(simple, images, params=SMALL, streams=streams, version=version)


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
    excess = (8 * len(data) - header_bits - stats.initial_bits - stats.bound_bits) / (len(images) * stats.dims)
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
    from flowmnist.codec.ans import _Stream
    from flowmnist.codec.layers import _actnorm_fwd, _actnorm_inv, _invconv_fwd, _invconv_inv

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


# --------------------------------------------------------------------------------------------------
# Portability: format 2 computes with integers, the same on every machine
# --------------------------------------------------------------------------------------------------

GOLDEN = Path(__file__).parent / "data" / "codec-golden.fmz"
# The IDX file it decodes to: the first 200 images of the MNIST training file (FLOWMNIST_TEST_DATA), as
# written by  compress_images(load_pretrained("multi-vardeq"), images, name="pretrained:multi-vardeq").
GOLDEN_COUNT = 200
GOLDEN_SHA256 = "58fe4ccaffc4eb302d28b92bf3f1c3d617991baa494805e898b0e0643c95606f"


def test_golden_file_decodes_byte_for_byte():
    """A file written once (on an AMD EPYC with AVX-512) decodes here to the very bytes it was made from, and
    its images encode here to the very same file: wherever the suite runs, this is a cross-machine test."""
    model, golden = load_pretrained("multi-vardeq"), GOLDEN.read_bytes()
    original, header = decompress_bytes(golden, model, name=str(GOLDEN))
    assert header.version == 2 and header.count == GOLDEN_COUNT
    assert hashlib.sha256(original).hexdigest() == GOLDEN_SHA256
    pixels = np.frombuffer(original, np.uint8, offset=16).reshape(-1, 28, 28)
    again, _ = compress_images(model, pixels, name=header.model_name, params=header.params, version=2)
    assert again == golden  # and this machine's encoder writes the very same file
    if has_real_data():
        images = read_idx(REAL_DATA / (FILES["train-images"][0] + ".gz"))[:GOLDEN_COUNT]
        assert original == idx_bytes(images)


GOLDEN3 = Path(__file__).parent / "data" / "codec-format3.fmz"
# Format 3, two streams of 12: images 210..233 of the MNIST training file, as written by
# compress_images(load_pretrained("multi-vardeq"), images, name="pretrained:multi-vardeq", streams=2).
GOLDEN3_SHA256 = "94608824f9835b47cea1986b5dd85209099fac5d4c5fb2d4bae3d25115c36595"


def test_golden_format_3_file_decodes_and_reencodes_byte_for_byte():
    """The streams' layout is pinned too: a committed two-stream file decodes with one worker to its
    original, and its images encode to the very same file."""
    model, golden = load_pretrained("multi-vardeq"), GOLDEN3.read_bytes()
    original, header = decompress_bytes(golden, model, name=str(GOLDEN3), workers=1)
    assert header.version == 3 and [p[0] for p in header.parts()] == [12, 12]
    assert hashlib.sha256(original).hexdigest() == GOLDEN3_SHA256
    pixels = np.frombuffer(original, np.uint8, offset=16).reshape(-1, 28, 28)
    again, _ = compress_images(model, pixels, name=header.model_name, params=header.params, streams=2)
    assert again == golden


def _capabilities() -> list[str]:
    """ATEN_CPU_CAPABILITY values this CPU can run: default always, avx2 and avx512 where it has them."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    return ["default"] + [c for c, f in (("avx2", "avx2"), ("avx512", "avx512f")) if f in flags]


_CHILD = """
import hashlib, sys
import numpy as np, torch
from flowmnist.codec import compress_images, decompress_bytes
from flowmnist.runs import load_pretrained
torch.set_num_threads(int(sys.argv[1]))
model = load_pretrained("multi-vardeq")
original, _ = decompress_bytes(open(sys.argv[2], "rb").read(), model)
images = np.frombuffer(original, np.uint8, offset=16).reshape(-1, 28, 28)
mine, _ = compress_images(model, images, params=__import__("flowmnist.codec").codec.CodecParams(batch=4, ramp=2))
print(hashlib.sha256(original).hexdigest(), hashlib.sha256(mine).hexdigest())
"""


def test_files_are_the_same_under_every_cpu_capability_and_thread_count(tmp_path):
    """Encode here, then in subprocesses under each ATEN_CPU_CAPABILITY with 1 or 2 threads: each decodes
    this file to the original bytes and encodes the images to this very file."""
    import os
    import subprocess
    import sys

    images = synthetic_digits(6, seed=11)[0]
    data, _ = compress_images(load_pretrained("multi-vardeq"), images, params=SMALL)
    (tmp_path / "f.fmz").write_bytes(data)
    want = f"{hashlib.sha256(idx_bytes(images)).hexdigest()} {hashlib.sha256(data).hexdigest()}"
    for i, cap in enumerate(_capabilities()):
        env = {**os.environ, "ATEN_CPU_CAPABILITY": cap}
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(1 + i % 2), str(tmp_path / "f.fmz")],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=900,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split("\n")[-2] == want, cap


FORMAT1 = Path(__file__).parent / "data" / "codec-format1.fmz"
# Written by format 1's codec (float32 nets, AVX-512 AMD EPYC, torch 2.13.0+cpu) from images 200..209 of the
# MNIST training file with the shipped multi-vardeq; the IDX file it decodes to has this SHA-256.
FORMAT1_SHA256 = "656e3d6bcb70081381d6706983d31f41723e4b363a0815bef2e716714b05d599"


def test_a_committed_format_1_file_decodes_or_is_refused_in_one_line(tmp_path):
    """Under each ATEN_CPU_CAPABILITY: where the nets compute as they did when it was written, the file
    decodes to its bytes; elsewhere `decompress` refuses it in one line saying it is a format-1 file, and
    writes nothing."""
    import os
    import subprocess
    import sys

    for cap in _capabilities():
        out = tmp_path / f"{cap}.idx"
        run = subprocess.run(
            [sys.executable, "-m", "flowmnist", "decompress", str(FORMAT1), str(out)],
            env={**os.environ, "ATEN_CPU_CAPABILITY": cap},
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        if run.returncode == 0:
            assert hashlib.sha256(out.read_bytes()).hexdigest() == FORMAT1_SHA256, cap
        else:
            err = run.stderr.strip().splitlines()
            assert run.returncode == 2 and len(err) == 1 and "a format-1 file" in err[0], (cap, err)
            assert not out.exists()


def test_a_format_1_file_still_decodes_here(simple):
    images = synthetic_digits(5, seed=12)[0]
    data, _ = compress_images(simple, images, params=SMALL, version=1)
    original, header = decompress_bytes(data, simple)
    assert header.version == 1 and original == idx_bytes(images)


@pytest.mark.parametrize(
    "version, message",
    [(1, "a format-1 file"), (2, "computed the model differently"), (3, "computed the model differently")],
)
def test_undecodable_file_with_its_own_crc_says_why(simple, version, message):
    """A file whose own CRC-32 holds but that decodes to other bytes: format 1 says it decodes only where it
    was written, format 2 that this machine computed the model differently, naming the file's numerics."""
    data, _ = compress_images(simple, synthetic_digits(3, seed=13)[0], params=SMALL, version=version)
    with pytest.raises(FlowmnistError, match=message) as e:
        decompress_bytes(_flip_payload_fix_crc(data), simple)
    assert "\n" not in str(e.value)
    if version >= 2:
        assert read_header(data).numerics in str(e.value)


def test_the_header_names_the_integer_weights(simple, vardeq):
    """The SHA-256 in a file is of what the codec computes with: another weight that rounds to the same
    integers names the same model; the float weights' own hash is not it."""
    data = compress(simple, synthetic_digits(1)[0], params=SMALL)
    sha = read_header(data).weights_sha256
    twin = build_model("simple")
    twin.load_state_dict(simple.state_dict())
    with torch.no_grad():  # far below the weights' last integer bit: rounds to the same integers
        twin.flows[0].net.net[0].weight.mul_(1 + 1e-7)
    assert read_header(compress(twin, synthetic_digits(1)[0], params=SMALL)).weights_sha256 == sha
    assert sha != read_header(compress(vardeq, synthetic_digits(1)[0], params=SMALL)).weights_sha256


def test_coupling_coder_grows_the_stream_by_its_log_determinant(vardeq):
    """One affine coupling on the grid 2^-16: the stream grows by -sum s / ln 2 bits (to the scales' 11
    bits), the inverse restores values and stream word for word."""
    from flowmnist.codec.ans import _Stream
    from flowmnist.codec.layers import _coupling_fwd, _coupling_inv
    from flowmnist.codec.plan import make_plan

    plan = make_plan(vardeq, CodecParams())
    layer = plan.flows[0]
    k = torch.from_numpy(np.random.default_rng(1).integers(-(1 << 17), 1 << 17, (2, 1, 28, 28)))
    words = np.random.default_rng(0).integers(1, 2**32, 8000, dtype=np.uint32)
    st, ideal = _Stream(words), np.zeros(2)
    before = st.c.num_valid_bits()
    m = _coupling_fwd(st, plan, layer, k, 16, None, ideal)
    grown = st.c.num_valid_bits() - before
    assert abs(grown - ideal.sum() / math.log(2)) < 0.002 * k.numel() / 2, (grown, ideal.sum() / math.log(2))
    assert torch.equal(_coupling_inv(st, plan, layer, m, 16, None), k)
    assert np.array_equal(st.words(), _Stream(words).words())


# --- integer layers against plain Python integers -------------------------------------------------

SPEC = intnet.IntSpec()


def _py_conv(x, w, b, f, pad, amax):
    """The integer convolution in Python ints: floor((sum w a + b) / 2^f), clamped."""
    n, ci, h, wd = len(x), len(x[0]), len(x[0][0]), len(x[0][0][0])
    co, kh = len(w), len(w[0][0])
    out = [[[[0] * wd for _ in range(h)] for _ in range(co)] for _ in range(n)]
    for i in range(n):
        for o in range(co):
            for y in range(h):
                for xx in range(wd):
                    acc = b[o]
                    for c in range(ci):
                        for dy in range(kh):
                            for dx in range(kh):
                                yy, xs = y + dy - pad, xx + dx - pad
                                if 0 <= yy < h and 0 <= xs < wd:
                                    acc += w[o][c][dy][dx] * x[i][c][yy][xs]
                    out[i][o][y][xx] = max(-amax, min(amax, acc >> f))
    return out


def _nchw(layer, x: torch.Tensor) -> torch.Tensor:
    """An integer layer (channels first, (C, B, H, W)) applied to an NCHW tensor, its result NCHW."""
    return layer(x.transpose(0, 1).contiguous()).transpose(0, 1)


def _ints(draw_seed: int, shape, bound: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(draw_seed).integers(-bound, bound + 1, shape))


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([1, 3]), st.integers(1, 3), st.integers(1, 3), st.floats(0.01, 30))
def test_integer_conv_equals_python_integers(seed, ksize, ci, co, scale):
    torch.manual_seed(seed % 1000)
    conv = torch.nn.Conv2d(ci, co, ksize, padding=ksize // 2)
    with torch.no_grad():
        conv.weight.mul_(scale)
        conv.bias.mul_(scale)
    ic = intnet.IConv(conv, SPEC)
    x = _ints(seed, (2, ci, 3, 4), SPEC.amax)
    w = ic.weight.long().tolist()
    ref = _py_conv(x.tolist(), w, ic.bias.long().tolist(), ic.f, ksize // 2, SPEC.amax)
    assert _nchw(ic, x.double()).long().tolist() == ref
    assert np.abs(w).max() < 2 ** (SPEC.weight_bits - 1)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_concat_elu_and_gate_equal_python_integers(seed):
    a, amax = SPEC.act_bits, SPEC.amax
    elu_t, sig_t = intnet.elu_table(a).tolist(), intnet.sigmoid_table(a).tolist()
    j = (len(sig_t) - 1) // 2

    def elu(v):
        return v if v > 0 else elu_t[min(-v, len(elu_t) - 1)]

    x = _ints(seed, (1, 2, 2, 3), amax)
    got = _nchw(lambda v: intnet.concat_elu(v, a), x.double()).long()
    xs = x.flatten().tolist()
    assert got[:, :2].flatten().tolist() == [elu(v) for v in xs]
    assert got[:, 2:].flatten().tolist() == [elu(-v) for v in xs]
    b = _ints(seed + 1, (50,), amax)
    assert intnet.sigmoid(b.double(), a).long().tolist() == [sig_t[max(-j, min(j, v)) + j] for v in b.tolist()]
    # the gate: x + floor(p sigmoid(q) / 2^A), clamped
    block = build_model("simple").flows[0].net.net[1]
    perturb(block, 0.3, seed % 1000)
    gate = intnet.IGate(block, SPEC)
    x = _ints(seed + 2, (1, 32, 2, 2), amax)
    h = _nchw(lambda v: gate.c2(intnet.concat_elu(gate.c1(intnet.concat_elu(v, a)), a)), x.double()).long()
    p, q = h[:, :32].tolist(), h[:, 32:].tolist()
    got = _nchw(gate, x.double()).long().tolist()
    xs = x.tolist()
    for c in range(32):
        for y in range(2):
            for z in range(2):
                pq = p[0][c][y][z] * sig_t[max(-j, min(j, q[0][c][y][z])) + j]
                assert got[0][c][y][z] == max(-amax, min(amax, xs[0][c][y][z] + (pq >> a)))


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 96), st.sampled_from([4, 12, 19]))
def test_layer_norm_equals_python_integers(seed, n, magnitude_bits):
    from flowmnist.nets import LayerNormChannels

    norm = LayerNormChannels(n)
    perturb(norm, 0.5, seed % 1000)
    inorm = intnet.INorm(norm, SPEC)
    x = _ints(seed, (1, n, 1, 3), min(SPEC.amax, 1 << magnitude_bits))
    got = _nchw(inorm, x.double()).long()
    g, beta = [int(v) for v in inorm.gamma.flatten()], [int(v) for v in inorm.beta.flatten()]
    for p in range(3):
        col = [int(x[0, c, 0, p]) for c in range(n)]
        s1, s2 = sum(col), sum(v * v for v in col)
        r = math.isqrt((n * s2 - s1 * s1 + inorm.eps) << (2 * inorm.guard))
        for c in range(n):
            y = ((n * col[c] - s1) << (SPEC.act_bits + inorm.guard)) // r
            want = max(-SPEC.amax, min(SPEC.amax, (y * g[c] >> inorm.g) + beta[c]))
            assert int(got[0, c, 0, p]) == want


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(-(2**21), 2**21), st.integers(1, 2**31), st.integers(-2, 2)), min_size=1))
def test_floor_division_in_float64_is_exact(cases):
    """The layer norm's division, quotients near an integer (q r + e) and far from one, against Python."""
    num = [q * r + e for q, r, e in cases]
    den = [r for _, r, _ in cases]
    got = intnet._floor_div(torch.tensor(num, dtype=torch.float64), torch.tensor(den, dtype=torch.float64))
    assert got.long().tolist() == [a // b for a, b in zip(num, den, strict=True)]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 2**62), min_size=1, max_size=50))
def test_isqrt_is_exact(values):
    got = intnet.isqrt(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [math.isqrt(v) for v in values]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-700, 700), min_size=1, max_size=50))
def test_exact_maths_is_within_a_few_ulp(values):
    """The portable exp and log agree with the platform's to a few units in the last place."""
    from flowmnist.codec import exact

    x = np.array(values)
    np.testing.assert_allclose(exact.exp(x), np.exp(x), rtol=4e-16)
    pos = np.exp(x / 2)
    np.testing.assert_allclose(exact.log(pos), np.log(pos), rtol=4e-16, atol=4e-16)


def test_cli_compress_defaults_to_the_best_shipped_model(tmp_path, capsys):
    """The default is the shipped MNIST model of the lowest test bpd (an unconditional one: its rate is its
    bound without the label's bits back), and a file it wrote decompresses with no model named."""
    import json

    from flowmnist.cli.codec import DEFAULT_MODEL
    from flowmnist.runs import PRETRAINED_ROOT, pretrained_names

    results = {m: json.loads((PRETRAINED_ROOT / m / "results.json").read_text()) for m in pretrained_names()}
    unconditional = [m for m, r in results.items() if r.get("dataset", "mnist") == "mnist" and not r.get("conditional")]
    mnist = {m: results[m]["bpd"]["test"] for m in unconditional}
    assert DEFAULT_MODEL == min(mnist, key=mnist.get), mnist
    write_idx(tmp_path / "one-idx3-ubyte", synthetic_digits(1, seed=14)[0])
    assert main(["compress", str(tmp_path / "one-idx3-ubyte"), str(tmp_path / "one.fmz")]) == 0
    assert read_header((tmp_path / "one.fmz").read_bytes()).model_name == f"pretrained:{DEFAULT_MODEL}"
    assert main(["decompress", str(tmp_path / "one.fmz"), str(tmp_path / "back")]) == 0
    assert (tmp_path / "back").read_bytes() == (tmp_path / "one-idx3-ubyte").read_bytes()


def _idx_claiming_more(path: Path) -> None:
    raw = bytearray(idx_bytes(synthetic_digits(2)[0]))
    raw[4:8] = struct.pack(">I", 3)  # the header says 3 images, 2 follow
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(b""), "too short"),
        (_idx_claiming_more, "truncated"),
        (lambda p: write_idx(p, synthetic_digits(4)[1]), "expected N x H x W images"),
        (lambda p: p.write_bytes(np.random.default_rng(1).bytes(900)), "IDX"),
        (
            lambda p: write_idx(p, np.pad(synthetic_digits(2)[0], ((0, 0), (2, 2), (2, 2)))),
            "in-idx3-ubyte: images of 32x32 pixels, the model's are 28x28",
        ),
    ],
    ids=["empty", "header-claims-more-images", "labels-file", "random-bytes", "other-size"],
)
def test_cli_compress_bad_input_one_line_nothing_written(tmp_path, capsys, make, message):
    make(tmp_path / "in-idx3-ubyte")
    assert main(["compress", "--pretrained", "simple", str(tmp_path / "in-idx3-ubyte"), str(tmp_path / "o.fmz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o.fmz").exists()


@pytest.mark.parametrize("option", [["--streams", "3"], ["--streams", "0"], ["--workers", "0"]])
def test_cli_bad_streams_or_workers_one_line_nothing_written(tmp_path, capsys, option):
    write_idx(tmp_path / "in-idx3-ubyte", synthetic_digits(2)[0])
    args = ["compress", "--pretrained", "simple", *option, str(tmp_path / "in-idx3-ubyte"), str(tmp_path / "o.fmz")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and option[0] in err[0], err
    assert not (tmp_path / "o.fmz").exists()


def test_cli_decompress_empty_file(tmp_path, capsys):
    (tmp_path / "e.fmz").write_bytes(b"")
    assert main(["decompress", str(tmp_path / "e.fmz"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a flowmnist compressed file" in err[0]
    assert not (tmp_path / "out").exists()


def test_conditional_model_roundtrip_and_rate_near_its_marginal_bound(real_digits):
    """The class-conditional model codes the label by bits back (decoded under its posterior q(y | x),
    encoded again by the decoder): the file's bound is near the model's marginal single-sample bpd (an
    independent noise draw: within 4 standard errors and 0.002 bits/dim)."""
    model = load_pretrained("multi-vardeq-cond")
    images = real_digits[:16, 0].numpy()
    data, stats = compress_images(model, images)
    assert decompress_bytes(data, model)[0] == idx_bytes(images)
    with torch.no_grad():
        bpd = model.bpd(torch.from_numpy(images.copy()).unsqueeze(1)).double().numpy()
    se = math.sqrt(2) * bpd.std() / math.sqrt(len(bpd))
    assert abs(stats.bound_bpd - bpd.mean()) < 4 * se + 0.002, (stats.bound_bpd, bpd.mean(), se)


def test_refuses_class_means_beyond_the_final_latent():
    """A conditional model with class Gaussians on every latent dimension is refused in one line."""
    model = perturb(build_model("multi-simple", prior=PriorSpec("class")), 0.02).eval()
    with pytest.raises(FlowmnistError, match="ClassPrior"):
        compress(model, synthetic_digits(1)[0])


def test_elementwise_map_grows_the_stream_by_its_log_determinant(vardeq):
    """The dequantization's map (noise h -> pixel bin -> logit space) on real-looking pixels: the stream
    grows by log2 |K(m)| per pixel, the continuous map's -log2 g'(h) plus log2(delta_z / delta_h), to
    0.005 bits a pixel on average (whole fine cells); the inverse restores pixels, noise and stream."""
    from flowmnist.codec.ans import _Stream
    from flowmnist.codec.layers import ymap_fwd, ymap_inv
    from flowmnist.codec.plan import make_plan

    plan = make_plan(vardeq, CodecParams())
    rng = np.random.default_rng(3)
    x = synthetic_digits(2, seed=15)[0][:, None].astype(np.int64)
    h = np.log(u := rng.uniform(0.02, 0.98, x.shape)) - np.log1p(-u)
    ky = np.floor(h / plan.dy).astype(np.int64)
    words = rng.integers(1, 2**32, 8000, dtype=np.uint32)
    st, ideal = _Stream(words), np.zeros(2)
    before = st.c.num_valid_bits()
    m = ymap_fwd(st, plan, ky, x, ideal)
    grown = st.c.num_valid_bits() - before
    want = (ideal.sum() + x.size * math.log(plan.dz / plan.dy)) / math.log(2)
    assert abs(grown - want) < 0.005 * x.size, (grown, want)
    back_x, back_ky = ymap_inv(st, plan, m)
    assert np.array_equal(back_x, x) and np.array_equal(back_ky, ky)
    assert np.array_equal(st.words(), _Stream(words).words())
