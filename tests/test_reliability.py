"""Nothing lost, nothing let in: fuzzed IDX input, kills at random points, signals, crafted checkpoints."""

from __future__ import annotations

import gzip
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_mnist_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowmnist import config as C
from flowmnist.cli import main
from flowmnist.config import Config, FlowmnistError
from flowmnist.data import DataError, parse_idx, read_idx, write_idx
from flowmnist.flows import Dequantization, Flow
from flowmnist.models import FlowModel, build_model
from flowmnist.runs import load_checkpoint, load_model, read_metrics, save_checkpoint

SRC = str(Path(__file__).resolve().parents[1] / "src")

# --- bad data input ---------------------------------------------------------------------------


def _valid_idx(dims: tuple[int, ...], seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, dims, dtype=np.uint8)
    return bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + arr.tobytes()


def _assert_matches_header(arr: np.ndarray, raw: bytes) -> None:
    """A parsed array is exactly what the IDX bytes say: the header's dimensions, then the data."""
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    assert arr.dtype == np.uint8 and arr.shape == dims
    assert arr.tobytes() == raw[4 + 4 * ndim :]


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=64))
def test_fuzz_random_bytes(buf):
    """Random bytes: a valid array or the project's DataError, never anything else."""
    try:
        arr = parse_idx(buf)
    except DataError:
        return
    _assert_matches_header(arr, buf)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dims=st.lists(st.integers(0, 6), min_size=1, max_size=4),
    cut=st.integers(0, 400),
    flip=st.tuples(st.integers(0, 30), st.integers(0, 255)),
    gz=st.booleans(),
)
def test_fuzz_truncated_and_corrupted_files(tmp_path_factory, dims, cut, flip, gz):
    """Valid IDX files, truncated at a random point and with one random byte changed, raw or gzipped:
    read_idx returns an array consistent with its header or raises DataError."""
    buf = bytearray(_valid_idx(tuple(dims)))
    if flip[0] < len(buf):
        buf[flip[0]] = flip[1]
    data = bytes(buf)
    if gz:
        data = gzip.compress(data)
    data = data[: len(data) - min(cut, len(data))] if cut % 3 else data
    path = tmp_path_factory.mktemp("fuzz") / ("f.idx.gz" if gz else "f.idx")
    path.write_bytes(data)
    try:
        arr = read_idx(path)
    except DataError as e:
        assert str(path) in str(e)
        return
    _assert_matches_header(arr, gzip.decompress(data) if gz else data)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("magic", "bad magic number"),
        ("ndim", "expected N x H x W images"),
        ("count", "truncated"),
        ("gz-truncated", "not a valid gzip file"),
        ("not-gz", "not a valid gzip file"),
        ("counts-differ", "images but train-labels-idx1-ubyte.gz has"),
        ("empty", "too short for an IDX header"),
        ("no-dir", "data directory does not exist"),
    ],
)
def test_cli_reports_damaged_data_in_one_line(tmp_path, capsys, damage, message):
    root = write_mnist_dir(tmp_path / "d", 24)
    images = root / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(images.read_bytes())
    if damage == "magic":
        images.write_bytes(gzip.compress(b"\x00\x00\x0d\x03" + raw[4:]))
    elif damage == "ndim":
        write_idx(images, np.zeros((24, 28 * 28), np.uint8))
    elif damage == "count":
        images.write_bytes(gzip.compress(raw[:4] + (25).to_bytes(4, "big") + raw[8:]))
    elif damage == "gz-truncated":
        images.write_bytes(images.read_bytes()[:-20])
    elif damage == "not-gz":
        images.write_bytes(raw)
    elif damage == "counts-differ":
        write_idx(root / "train-labels-idx1-ubyte.gz", np.zeros(23, np.uint8))
    elif damage == "empty":
        images.unlink()
        (root / "train-images-idx3-ubyte").write_bytes(b"")
    elif damage == "no-dir":
        root = tmp_path / "missing"
    code = main(["train", "--data-dir", str(root), "--out", str(tmp_path / "run"), "--epochs", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and message in err
    # It names the damaged file itself (the directory, when that is what is missing).
    named = {"no-dir": root, "empty": root / "train-images-idx3-ubyte"}.get(damage, images)
    assert err.startswith(f"flowmnist train: error: {named}: "), err
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.slow
def test_damaged_data_in_a_real_process_prints_no_traceback(tmp_path):
    """In-process, main() returns 2 or raises: whether a traceback reaches the user shows only in a real
    process, the `flowmnist` command: one line on stderr, nothing on stdout, exit status 2."""
    root = write_mnist_dir(tmp_path / "d", 24)
    images = root / "train-images-idx3-ubyte.gz"
    images.write_bytes(gzip.compress(b"\x00\x00\x0d\x03" + gzip.decompress(images.read_bytes())[4:]))
    cmd = [sys.executable, "-m", "flowmnist", "train", "--data-dir", str(root), "--out", str(tmp_path / "run")]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"flowmnist train: error: {images}: bad magic number 0x00000d03")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


# --- interrupted training ---------------------------------------------------------------------


def _train_cmd(data: Path, run: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "flowmnist",
        "train",
        "--model",
        "simple",
        "--data-dir",
        str(data),
        "--out",
        str(run),
        "--epochs",
        "3",
        "--batch-size",
        "8",
        "--val-every",
        "1",
        "--log-every",
        "1",
        "--no-compile",
        "--precision",
        "float32",
        *extra,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def _same_run(a: Path, b: Path) -> None:
    ca, cb = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert ca["state"]["step"] == cb["state"]["step"]
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "cpu_seconds")} for r in rows]  # noqa: E731
    assert strip(read_metrics(a)) == strip(read_metrics(b))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> tuple[Path, Path]:
    """The reference: the same run, never interrupted."""
    tmp = tmp_path_factory.mktemp("straight")
    data = write_mnist_dir(tmp / "data", 48)
    subprocess.run(_train_cmd(data, tmp / "run"), env=_env(), check=True, capture_output=True, timeout=600)
    return data, tmp / "run"


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_checkpoint_then_resume_matches(straight_run, tmp_path, sig, code):
    data, reference = straight_run
    run = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(data, run), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (run / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err.decode()[-2000:]
    assert b"checkpoint saved" in err
    step = load_checkpoint(run / "last.pt")["state"]["step"]
    assert 0 < step < 15
    if sig == signal.SIGTERM:  # the resume after either signal is the same code: run it once
        subprocess.run(_train_cmd(data, run, "--resume"), env=_env(), check=True, capture_output=True, timeout=600)
        _same_run(run, reference)


@pytest.mark.slow
def test_kill9_at_random_points_loses_nothing(straight_run, tmp_path):
    """SIGKILL at random moments (checkpoints are written every step, so some kills land inside a
    write): each time the last checkpoint must load, a restart must resume from it, never going back, and
    resuming to the end must give exactly the uninterrupted run. Every other restart is killed only
    after it has written a checkpoint of its own, so that restarts from checkpoints past step 0 (the
    mid-run resumes this is about) happen however fast or slow the machine is."""
    data, reference = straight_run
    run = tmp_path / "run"
    rng = random.Random(1234)
    kills, resumed_from = 0, []

    def mtime(path: Path) -> int | None:
        return path.stat().st_mtime_ns if path.exists() else None

    for i in range(4):
        resume = ["--resume"] if (run / "last.pt").exists() else []
        if resume:
            resumed_from.append(load_checkpoint(run / "last.pt")["state"]["step"])
        elif run.exists():
            resume = ["--force"]  # killed before the first checkpoint: start again
        # Wait past start-up (torch import, data): training (re)writes the log as it starts; on every other
        # restart, wait for a new checkpoint too.
        wait_for = run / ("last.pt" if i % 2 == 0 else "metrics.csv")
        stamp = mtime(wait_for)
        proc = subprocess.Popen(
            _train_cmd(data, run, *resume), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        while proc.poll() is None and mtime(wait_for) in (None, stamp):
            time.sleep(0.02)
        if resume == ["--resume"] and wait_for.name == "last.pt" and proc.poll() is None:
            # The restart's first checkpoint continues from the one it resumed (a restart from scratch
            # would reach the same end, deterministically, and would pass the comparison below).
            assert load_checkpoint(run / "last.pt")["state"]["step"] > resumed_from[-1]
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.wait(timeout=60)
        if (run / "last.pt").exists():
            step = load_checkpoint(run / "last.pt")["state"]["step"]  # never half-written
            if resume == ["--resume"]:
                assert step >= resumed_from[-1]  # a resumed run never goes back
        assert not any(p.name == "last.pt" and p.stat().st_size == 0 for p in run.iterdir())
    assert kills >= 2
    assert any(s > 0 for s in resumed_from), resumed_from  # some restart resumed mid-run
    subprocess.run(_train_cmd(data, run, "--resume"), env=_env(), check=True, capture_output=True, timeout=600)
    _same_run(run, reference)
    assert not list(run.glob(".*.tmp"))  # stale temporary files from killed writes are cleared


def _timed_cmd(data: Path, run: Path, *extra: str) -> list[str]:
    """No step-based validation or checkpoint: last.pt comes from --checkpoint-minutes alone (0.12 s),
    many times within each 20-step epoch."""
    cmd = _train_cmd(data, run, "--batch-size", "2", "--epochs", "2", "--checkpoint-minutes", "0.002", *extra)
    i = cmd.index("--val-every")
    return cmd[:i] + cmd[i + 2 :]


@pytest.mark.slow
def test_kill9_after_a_timed_checkpoint_resumes_mid_epoch_bit_for_bit(tmp_path):
    """A run whose epochs outlast the checkpoint interval writes last.pt mid-epoch by the clock; SIGKILL
    after the interval has passed loses only the steps since, and resuming continues exactly as the
    uninterrupted run does (its final weights and every log row)."""
    data = write_mnist_dir(tmp_path / "data", 48)
    reference = tmp_path / "straight"
    subprocess.run(_timed_cmd(data, reference), env=_env(), check=True, capture_output=True, timeout=600)
    run = tmp_path / "run"
    proc = subprocess.Popen(_timed_cmd(data, run), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline, state = time.time() + 300, {}
    while proc.poll() is None and time.time() < deadline:
        if (run / "last.pt").exists():
            state = load_checkpoint(run / "last.pt")["state"]
            if state["step"] > 0 and 0 < state["batch"]:
                break
        time.sleep(0.01)
    proc.kill()
    proc.wait(timeout=60)
    assert state.get("step", 0) > 0 and state["batch"] > 0, state  # a mid-epoch checkpoint past step 0
    resumed_from = load_checkpoint(run / "last.pt")["state"]["step"]
    assert resumed_from >= state["step"]
    subprocess.run(_timed_cmd(data, run, "--resume"), env=_env(), check=True, capture_output=True, timeout=600)
    _same_run(run, reference)


def test_crash_during_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    """A failure after part of the new checkpoint is written leaves the old one intact and no temp file."""
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"config": Config().to_dict(), "model": {"w": torch.ones(3)}})

    def dying_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(C.os, "fsync", dying_fsync)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, {"config": Config().to_dict(), "model": {"w": torch.zeros(3)}})
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# --- numerical faults -------------------------------------------------------------------------


class _NanForBrightImages(Flow):
    """The identity, with a NaN ldj for each image whose every pixel is bright (logit > 4): a model that
    fails on one image and is fine on the others."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bright = (x.flatten(1) > 4).all(dim=1)
        return x, torch.where(bright, math.nan, 0.0).to(x.dtype)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return z


def test_nan_is_never_dropped_from_an_average():
    """One NaN image among finite ones: its own bpd is NaN, the others' are untouched, and the average
    over the set is NaN (a nanmean would report the finite images' mean)."""
    from flowmnist.evaluate import dataset_bpd, image_bpd

    images = torch.randint(0, 200, (4, 1, 28, 28), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    images[2] = 255
    model = FlowModel(Dequantization(), [_NanForBrightImages()])
    iw, single = image_bpd(model, images, k=2)
    assert torch.isnan(iw).tolist() == torch.isnan(single).tolist() == [False, False, True, False]
    clean_iw, clean_single = image_bpd(FlowModel(Dequantization(), []), images, k=2)
    assert torch.equal(iw[[0, 1, 3]], clean_iw[[0, 1, 3]]) and torch.equal(single[[0, 1, 3]], clean_single[[0, 1, 3]])
    bpd, single_mean = dataset_bpd(model, images, k=2)
    assert math.isnan(bpd) and math.isnan(single_mean)
    assert math.isfinite(dataset_bpd(model, images[[0, 1, 3]], k=2)[0])


def test_one_nan_image_fails_its_training_step_and_the_validation(tiny_data, tmp_path, monkeypatch):
    """In training, one NaN image among finite ones makes its step's loss (the batch mean) NaN, so that
    step is skipped, logged and counted; and makes the validation average NaN (sums over the split,
    never a nansum). The model's log-likelihood is NaN for one training and one validation image."""
    from flowmnist.data import load_dir
    from flowmnist.train import train

    data = load_dir(tiny_data)
    poisoned = torch.stack([data.images["train"][0], data.images["val"][0]]).flatten(1)
    real = FlowModel.log_prob_single

    def log_prob_single(self, x, noise=None, y=None):
        lp = real(self, x, noise, y)
        hit = (x.flatten(1).unsqueeze(1) == poisoned.to(x.device).unsqueeze(0)).all(-1).any(-1)
        return torch.where(hit, math.nan, lp)

    monkeypatch.setattr(FlowModel, "log_prob_single", log_prob_single)
    cfg = Config(
        model="simple", data_dir=str(tiny_data), epochs=1, batch_size=8, log_every=1, compile=False, precision="float32"
    )
    s = train(cfg, tmp_path / "run")
    assert s["step"] == 4 and s["nonfinite_steps"] == 1  # 5 batches, one of them holds the NaN image
    rows = read_metrics(tmp_path / "run")
    assert [r["split"] for r in rows].count("nonfinite") == 1
    assert all(math.isnan(r["bpd"]) == (r["split"] in ("nonfinite", "val")) for r in rows), rows
    assert rows[-1]["split"] == "val" and math.isnan(s["val_bpd"])
    # The validation is NaN because of the one image: the other validation images are finite.
    model, _ = load_model(tmp_path / "run")
    monkeypatch.undo()
    with torch.no_grad():
        lp = model.log_prob_single(data.images["val"][1:])
    assert torch.isfinite(lp).all()


# --- untrusted checkpoints --------------------------------------------------------------------


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_crafted_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"format_version": 1, "config": {}, "model": {}, "x": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(FlowmnistError, match="evil.pt: not a loadable flowmnist checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_other_version_and_other_model_are_refused(tmp_path):
    cfg = Config(model="simple").to_dict()
    torch.save({"format_version": 99, "config": cfg, "model": {}}, tmp_path / "v.pt")
    with pytest.raises(FlowmnistError, match="format version 99, this flowmnist reads version 1"):
        load_checkpoint(tmp_path / "v.pt")
    save_checkpoint(tmp_path / "m.pt", {"config": cfg, "model": build_model("vardeq").state_dict()})
    with pytest.raises(FlowmnistError, match="weights do not fit model 'simple'"):
        load_model(tmp_path / "m.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(FlowmnistError, match="junk.pt: not a loadable"):
        load_checkpoint(tmp_path / "junk.pt")


# --- bad options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "big"], "argument --model: invalid choice: 'big'"),
        (["--epochs", "-1"], "argument --epochs: must be a positive integer, got '-1'"),
        (["--minutes", "0"], "argument --minutes: must be a positive finite number, got '0'"),
        (["--lr", "nan"], "argument --lr: must be a positive finite number"),
        (["--batch-size", "x"], "argument --batch-size: must be a positive integer, got 'x'"),
    ],
)
def test_bad_options_fail_before_work(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


def test_unwritable_out_fails_before_work(tiny_data, tmp_path, capsys, monkeypatch):
    """An --out that cannot be written is a one-line error before any work (no data read, nothing
    written). Directory permissions do not bind root, and CI runs as root, so two ways that hold for any
    user: the CLI's writability check (os.access) finding a read-only directory, and a run directory
    under a regular file, which no user can create (training's own probe meets ENOTDIR)."""
    import flowmnist.train as T

    def no_data(*args, **kw):
        raise AssertionError("data was loaded before the output was checked")

    monkeypatch.setattr(T, "load_data", no_data)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access

    def access(path, mode, *args, **kw):
        return False if Path(path) == locked and mode & os.W_OK else real_access(path, mode, *args, **kw)

    monkeypatch.setattr(os, "access", access)
    assert main(["train", "--data-dir", str(tiny_data), "--out", str(locked / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"flowmnist train: error: --out {locked / 'run'}: directory {locked} is not writable"
    assert list(locked.iterdir()) == []

    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "run"
    assert main(["train", "--data-dir", str(tiny_data), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"flowmnist train: error: {out}: cannot write to the run directory (Not a directory)"
    assert (tmp_path / "file").read_text() == "x"


def test_out_is_a_file_fails_clearly(tiny_data, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["train", "--data-dir", str(tiny_data), "--out", str(tmp_path / "file")]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
