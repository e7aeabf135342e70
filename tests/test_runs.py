"""The run directory and the shipped pretrained runs: export, manifest checks, --pretrained on every
command, load_pretrained, torch.hub, and the models that really ship."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import fashion_data_or_skip, full_data_or_skip, real_data_or_skip, write_mnist_dir
from helpers import PARAMS

from flowmnist import runs
from flowmnist.cli import main
from flowmnist.config import Config, FlowmnistError
from flowmnist.data import load_dir
from flowmnist.evaluate import class_scores, dataset_bpd, evaluate_run, image_class_log_probs
from flowmnist.models import count_params

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shipped_root(tiny_run, data_dir, tmp_path_factory) -> Path:
    """A pretrained root made the way the real one is: the tiny run, evaluated, exported as two names."""
    run = tmp_path_factory.mktemp("trained") / "simple"
    shutil.copytree(tiny_run, run)
    evaluate_run(run, ["val"], k=2, max_images=16, timing_reps=1)
    root = tmp_path_factory.mktemp("pretrained")
    runs.export_run(run, root / "simple")
    runs.export_run(run, root / "other")
    shutil.copytree(runs.PRETRAINED_ROOT / runs.DIGITS, root / runs.DIGITS)
    runs.write_manifest(root)
    return root


@pytest.fixture
def shipped(shipped_root, tmp_path, monkeypatch) -> Path:
    """A private copy of the pretrained root, installed as the package's for this test."""
    root = tmp_path / "pretrained"
    shutil.copytree(shipped_root, root)
    monkeypatch.setattr(runs, "PRETRAINED_ROOT", root)
    return root


def _one_line_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in err, err
    return err


# --- export and manifest ------------------------------------------------------------------------


def test_export_is_weights_only_float32_and_the_final_weights(shipped, tiny_run):
    ckpt = torch.load(shipped / "simple" / runs.WEIGHTS, weights_only=True)
    assert set(ckpt) == {"format_version", "config", "model", "state"}  # no optimizer, no RNG
    assert ckpt["config"]["data_dir"] is None  # the trainer's path is not shipped
    final = runs.load_checkpoint(tiny_run / "last.pt")["model"]
    assert ckpt["model"].keys() == final.keys()
    for k, v in ckpt["model"].items():
        assert v.dtype == torch.float32 and torch.equal(v, final[k].float()), k
    results = json.loads((shipped / "simple" / "results.json").read_text())
    assert results["checkpoint"] == runs.WEIGHTS
    assert results["training"]["steps"] == runs.load_checkpoint(tiny_run / "last.pt")["state"]["step"] > 0
    assert results["training"]["epochs"] == 1


def test_manifest_lists_every_file_with_its_sha256(shipped):
    manifest = runs.read_manifest(shipped)
    assert manifest["runs"] == ["simple", "other"]  # models.MODELS order first, then by name
    for name in ("simple", "other"):
        for f in runs.PRETRAINED_FILES:
            assert manifest["files"][f"{name}/{f}"] == runs.sha256(shipped / name / f)
    assert any(k.startswith("digits/") for k in manifest["files"])


def test_load_pretrained_gives_the_run_in_eval_mode(shipped, tiny_run):
    model = runs.load_pretrained("simple")
    assert not model.training
    ref, _ = runs.load_model(tiny_run / "last.pt")
    x = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.log_prob_single(x, u), ref.log_prob_single(x, u))


@pytest.mark.parametrize(
    "damage, words",
    [
        ("flip", ["model.pt", "SHA-256 does not match"]),
        ("truncate", ["model.pt", "SHA-256 does not match"]),
        ("delete", ["model.pt", "missing"]),
        ("flip-config", ["config.json", "SHA-256 does not match"]),
    ],
)
def test_a_damaged_shipped_file_is_refused_naming_it(shipped, damage, words, capsys):
    path = shipped / "simple" / ("config.json" if damage == "flip-config" else runs.WEIGHTS)
    data = path.read_bytes()
    if damage.startswith("flip"):
        i = len(data) // 2
        path.write_bytes(data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :])
    elif damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.unlink()
    for call in (lambda: runs.load_pretrained("simple"), lambda: runs.load_model(shipped / "simple")):
        with pytest.raises(FlowmnistError) as e:
            call()
        assert all(w in str(e.value) for w in words), str(e.value)
    assert main(["sample", "--pretrained", "simple", "--out", str(shipped.parent / "s.png")]) == 2
    _one_line_error(capsys, *words)
    assert not (shipped.parent / "s.png").exists()
    runs.load_pretrained("other")  # the other run's files are intact


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_a_crafted_pickle_with_a_matching_manifest_runs_no_code(shipped, tmp_path):
    _Evil.marker = tmp_path / "pwned"
    torch.save({"format_version": 1, "config": {}, "model": {}, "x": _Evil()}, shipped / "simple" / runs.WEIGHTS)
    runs.write_manifest(shipped)  # an attacker who can write the package can write its manifest too
    with pytest.raises(FlowmnistError, match="model.pt: not a loadable flowmnist checkpoint"):
        runs.load_pretrained("simple")
    assert not _Evil.marker.exists()


def test_unknown_and_missing_names_are_one_line_errors(shipped, tmp_path, capsys):
    assert main(["sample", "--pretrained", "nope", "--out", str(tmp_path / "s.png")]) == 2
    _one_line_error(capsys, "--pretrained nope", "simple, other")
    assert main(["sample", "--out", str(tmp_path / "s.png")]) == 2
    _one_line_error(capsys, "RUN_DIR or --pretrained")
    assert main(["sample", str(tmp_path), "--pretrained", "simple", "--out", str(tmp_path / "s.png")]) == 2
    _one_line_error(capsys, "not both")


# --- --pretrained on every command ---------------------------------------------------------------


def test_every_run_command_takes_pretrained(shipped, tmp_path, capsys):
    out = tmp_path / "figs"
    assert main(["sample", "--pretrained", "simple", "--out", str(tmp_path / "s.png"), "--n", "4"]) == 0
    assert (tmp_path / "s.png").is_file()
    assert main(["table", "--pretrained", "all"]) == 0
    table = capsys.readouterr().out
    assert "| simple |" in table and "| other |" in table and "| 1 |" in table  # both runs by name, 1 epoch each
    for cmd in (
        ["curves", "--pretrained", "all", "--out", str(out)],
        ["compare-samples", "--pretrained", "simple", "other", "--out", str(out), "--n", "4"],
        ["interpolate", "--pretrained", "simple", "--out", str(out), "--pairs", "1", "--walk-images", "3"],
        ["dequant", "--pretrained", "all", "--out", str(out), "--images", "4"],
    ):
        assert main(cmd) == 0, cmd
    names = {p.name for p in out.iterdir()}
    assert {"train_log.png", "val_log.png", "samples.png", "interpolation.png"} <= names
    assert {"dequant_simple_other.png", "dequant_simple_simple.png"} <= names


def test_evaluate_pretrained_on_a_test_split_leaves_the_package_unchanged(shipped, tmp_path, capsys):
    data = write_mnist_dir(tmp_path / "with-t10k", 48, 12)  # synthetic official-style t10k files
    before = runs.sha256(shipped / "simple" / "results.json")
    args = ["evaluate", "--pretrained", "simple", "--data-dir", str(data), "--split", "test"]
    assert main([*args, "--importance-samples", "2", "--timing-reps", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert list(r["bpd"]) == ["test"] and r["images"] == {"test": 12}
    images = load_dir(str(data)).split("test")[0]
    assert r["bpd"]["test"] == pytest.approx(dataset_bpd(runs.load_pretrained("simple"), images, 2)[0], abs=1e-5)
    assert runs.sha256(shipped / "simple" / "results.json") == before
    runs.verify_pretrained("simple")


def test_figures_of_shipped_runs_use_the_shipped_digits(shipped, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("FLOWMNIST_DATA", raising=False)
    monkeypatch.setenv("FLOWMNIST_CACHE", str(tmp_path / "empty-cache"))  # a download would fail here
    assert main(["dequant", "--pretrained", "simple", "--out", str(tmp_path), "--images", "8"]) == 0
    assert not (tmp_path / "empty-cache").exists()
    (shipped / "digits" / "train-labels-idx1-ubyte.gz").write_bytes(b"changed")
    assert main(["dequant", "--pretrained", "simple", "--out", str(tmp_path), "--images", "8"]) == 2
    _one_line_error(capsys, "train-labels-idx1-ubyte.gz", "SHA-256")


def test_shipped_images_are_picked_by_each_runs_dataset(shipped):
    from flowmnist.data import FILES, read_idx, write_idx
    from flowmnist.figures import eval_images

    fashion = shipped / "digits-fashion-mnist"
    fashion.mkdir()
    for key in ("train-images", "train-labels"):  # stand-ins: the MNIST digits inverted
        arr = read_idx(shipped / "digits" / (FILES[key][0] + ".gz"))
        write_idx(fashion / (FILES[key][0] + ".gz"), 255 - arr if key == "train-images" else arr)
    runs.write_manifest(shipped)
    dirs = runs.shipped_digits_by_dataset()
    assert dirs == {"fashion-mnist": str(fashion), "mnist": str(shipped / "digits")}
    digits, _, split = eval_images(Config(dataset="mnist"), dirs)
    clothes, _, _ = eval_images(Config(dataset="fashion-mnist"), dirs)
    assert split == "val" and torch.equal(clothes, 255 - digits)


def test_torch_hub_local_loads_the_shipped_model(shipped):
    model = torch.hub.load(str(REPO), "simple", source="local", trust_repo=True)
    assert not model.training and count_params(model) == PARAMS["simple"]
    assert torch.equal(
        next(iter(model.state_dict().values())), next(iter(runs.load_pretrained("simple").state_dict().values()))
    )


def test_torch_hub_untrained_models_are_the_shipped_architectures():
    untrained = torch.hub.load(str(REPO), "multi_vardeq", source="local", pretrained=False)
    assert count_params(untrained) == PARAMS["multi-vardeq"]
    cond = torch.hub.load(str(REPO), "multi_vardeq_cond", source="local", pretrained=False)
    cfg = runs.run_config(runs.PRETRAINED_ROOT / "multi-vardeq-cond")
    assert cond.conditional and count_params(cond) == PARAMS["multi-vardeq"] + prior_params(cfg)


def prior_params(cfg) -> int:
    """A trained class prior's size: a mean and a log-scale per digit and dimension of its class latent (the
    whole 784, or the multi-scale models' final 8 x 7 x 7); a fixed one (FlowGMM) has no parameters."""
    if not cfg.conditional or cfg.class_fixed:
        return 0
    return 2 * 10 * {"all": 784, "top": 392}[cfg.class_latent]


# --- an --out that is a directory where a file is expected -----------------------------------------


def test_out_naming_a_directory_is_a_one_line_error(tiny_run, tmp_path, capsys):
    d = tmp_path / "adir"
    d.mkdir()
    assert main(["sample", str(tiny_run), "--out", str(d)]) == 2
    _one_line_error(capsys, f"--out {d}", "is a directory")
    rows = tmp_path / "rows.csv"
    rows.mkdir()
    assert main(["score", str(tiny_run), "--png", str(d), "--out", str(rows)]) == 2
    _one_line_error(capsys, f"--out {rows}", "is a directory")


def test_sample_out_directory_error_in_a_real_process(tiny_run, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "flowmnist", "sample", str(tiny_run), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.strip() == f"flowmnist sample: error: --out {tmp_path}: is a directory; expected a file name"


# --- the models that really ship ---------------------------------------------------------------


SHIPPED = (
    "simple",
    "vardeq",
    "multi-simple",
    "multi-vardeq",
    "multi-vardeq-glow-wide",
    "multi-vardeq-glow-wide-long",
    "multi-vardeq-cond",
    "multi-vardeq-glow-wide-cond",
    "fashion-multi-vardeq",
)


def test_the_package_ships_its_models():
    names = runs.pretrained_names()
    assert set(SHIPPED) <= set(names), names
    assert set(runs.shipped_digits_by_dataset()) == {"mnist", "fashion-mnist"}
    for name in names:  # torch.hub serves every one
        model = torch.hub.load(str(REPO), name.replace("-", "_"), source="local", pretrained=False)
        assert count_params(model) == count_params(runs.load_pretrained(name))


def test_the_table_names_shipped_runs_as_shipped(capsys):
    """Two shipped runs of one architecture (the long run beside the 135-minute one) get a row each, by name."""
    from flowmnist.cli import main

    assert main(["table", "--pretrained", "multi-vardeq-glow-wide", "multi-vardeq-glow-wide-long"]) == 0
    rows = [line.split("|")[1].strip() for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == ["multi-vardeq-glow-wide", "multi-vardeq-glow-wide-long"]


@pytest.mark.slow
@pytest.mark.parametrize("name", runs.pretrained_names())
def test_each_shipped_model_loads_and_fits_real_digits(name):
    model = runs.load_pretrained(name)
    cfg = runs.run_config(runs.PRETRAINED_ROOT / name)
    assert count_params(model) == count_params(runs.model_of(cfg))
    assert count_params(model) == PARAMS[cfg.model] + prior_params(cfg)
    if cfg.dataset == "fashion-mnist":  # its test images: never trained on
        split, low, high, near = "test", 2.5, 3.5, 0.1  # a wider spread per image than digits
        images = load_dir(fashion_data_or_skip()).images[split][:256]
    else:  # MNIST, marginal bpd for a conditional model
        split, low, high, near = "val", 0.9, 1.3, 0.03
        images = load_dir(str(real_data_or_skip())).images[split][:256]
    bpd, single = dataset_bpd(model, images, k=1)
    # Trained to ~1.05–1.15 on MNIST (~2.9 on Fashion-MNIST); untrained ~5, a broken Jacobian anything.
    assert low < bpd < high, bpd
    # and close to what its results.json reports for the whole split (single-sample bound, all its images)
    shipped = json.loads((runs.PRETRAINED_ROOT / name / "results.json").read_text())["bpd_single_sample"][split]
    assert abs(bpd - shipped) < near, (bpd, shipped)


# Each shipped conditional model and what it must read of the first 500 val digits: a trained Gaussian per
# digit on all 784 dimensions, trained on log p(x | y) alone, reads 85 % of val; fixed, separated means on the
# final latent far more (multi-vardeq-cond: 96.4 % at K = 1). The long run's twin must read more than that.
CONDITIONAL_ACCURACY = {"multi-vardeq-cond": 0.93, "multi-vardeq-glow-wide-cond": 0.97}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(CONDITIONAL_ACCURACY) & set(runs.pretrained_names())))
def test_a_shipped_conditional_model_reads_held_out_digits(name):
    """As a Bayes classifier, argmax_y p(x | y) p(y), on the first 500 digits of full MNIST's val split (held
    out from its training), above its bound in ``CONDITIONAL_ACCURACY``."""
    model = runs.load_pretrained(name)
    x, y = load_dir(str(full_data_or_skip())).split("val")
    x, y = x[:500], y[:500]
    s = class_scores(image_class_log_probs(model, x, k=1), model.prior.log_py, y, model.dims)
    accuracy = float((s.predicted == y).double().mean())
    assert accuracy > CONDITIONAL_ACCURACY[name], accuracy
