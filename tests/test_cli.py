"""The command line: options and output paths, each failure one line and exit status 2."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
from pathlib import Path

import pytest

import flowmnist.cli
from flowmnist.cli import build_parser, main
from flowmnist.cli.train import PROCESS_OPTIONS, train_config
from flowmnist.commands import argv, runs_argv, shell_line
from flowmnist.config import Config
from flowmnist.runs import PRETRAINED_ROOT

# command -> its arguments, with OUT standing for the output path (a file name, or a folder for DIR/)
WRITERS = {
    "sample": ["sample", "--pretrained", "simple", "--out", "OUT/grid.png"],
    "curves": ["curves", "--pretrained", "simple", "--out", "OUT/DIR"],
    "compare-samples": ["compare-samples", "--pretrained", "simple", "--out", "OUT/DIR"],
    "interpolate": ["interpolate", "--pretrained", "simple", "--out", "OUT/DIR"],
    "dequant": ["dequant", "--pretrained", "simple", "--out", "OUT/DIR"],
    "concepts": ["concepts", "--out", "OUT/DIR"],
    "report": ["report", "--pretrained", "simple", "--out", "OUT/DIR"],
    "score": ["score", "--pretrained", "simple", "--data-dir", "NOWHERE", "--out", "OUT/scores.csv"],
    "ood": ["ood", "--pretrained", "simple", "--ood-data", "NOWHERE", "--out", "OUT/ood.png"],
    "compress": ["compress", "--pretrained", "simple", "NOWHERE", "OUT/digits.flow"],
    "decompress": ["decompress", "NOWHERE", "OUT/digits.idx"],
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_an_output_folder_that_cannot_be_made_is_one_line(name, tmp_path, capsys):
    """A regular file where the output's folder should go: no user can make that folder (root included,
    as CI runs), so every writing command must say so in one line, exit 2, and leave the file alone."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = [a.replace("OUT", str(blocker / "sub")) for a in WRITERS[name]]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    option = "--out" if "--out" in args else "OUT"
    assert f"flowmnist {name}: error: {option} {blocker / 'sub'}" in err and "cannot make the folder" in err, err
    assert blocker.read_text() == "x"


def test_a_directory_where_a_file_is_expected_is_refused(tmp_path, capsys):
    assert main(["sample", "--pretrained", "simple", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().endswith(f"--out {tmp_path}: is a directory; expected a file name")


def test_the_output_folder_is_made(tmp_path):
    out = tmp_path / "a" / "b" / "grid.png"
    assert main(["sample", "--pretrained", "simple", "--n", "4", "--out", str(out)]) == 0
    assert out.is_file()


def test_a_shipped_runs_samples_are_titled_by_its_shipped_name(tmp_path, monkeypatch):
    """Two shipped runs of one architecture (multi-vardeq-glow-wide and its long run) are told apart."""
    import flowmnist.plots

    titles = []
    monkeypatch.setattr(flowmnist.plots, "save_grid", lambda *a, **k: titles.append(k.get("title")))
    out = str(tmp_path / "grid.png")
    assert main(["sample", "--pretrained", "multi-vardeq-glow-wide-long", "--n", "1", "--out", out]) == 0
    assert titles == ["multi-vardeq-glow-wide-long samples (T=1)"]


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    """Each command's parser by its name (aliases left out)."""
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return {a.dest: sub.choices[a.dest] for a in sub._choices_actions}


def test_the_package_docstring_lists_every_command_once():
    listed = [line.split()[0] for line in flowmnist.cli.__doc__.splitlines() if line.startswith("  ")]
    assert sorted(listed) == sorted(_subcommands()) and len(set(listed)) == len(listed)


def test_every_train_option_is_a_config_field_or_a_process_option():
    """So a new Config field needs only its option to be settable: train derives its overrides."""
    dests = {a.dest for a in _subcommands()["train"]._actions if a.dest != "help"}
    fields = {f.name for f in dataclasses.fields(Config)}
    assert dests - fields == set(PROCESS_OPTIONS) and not set(PROCESS_OPTIONS) & fields


def test_train_options_override_the_defaults_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.delenv("FLOWMNIST_DATA", raising=False)
    parse = build_parser().parse_args
    assert train_config(parse(["train", "--out", str(tmp_path / "r")])) == Config()
    args = ["train", "--out", str(tmp_path / "r"), "--lr", "0.1", "--epochs", "3", "--plain", "--no-compile"]
    cfg = train_config(parse([*args, "--data-dir", "d", "--dataset", "fashion-mnist", "--conditional"]))
    want = {"lr": 0.1, "epochs": 3, "fast": False, "compile": False, "dataset": "fashion-mnist", "conditional": True}
    assert cfg == dataclasses.replace(Config(), data_dir=str(Path("d").resolve()), **want)
    assert train_config(parse(["train", "--out", "r", "--reference"])).fast is False  # the alias


SHIPPED = PRETRAINED_ROOT / "simple"
# (command, its runs or None, options by parser dest): every kind of command line the report writes
WRITTEN = [
    ("curves", [Path("runs/a"), SHIPPED], {"out": Path("out")}),
    ("compare-samples", [SHIPPED], {"out": Path("out"), "n": 4, "seed": 3, "temperature": 0.7}),
    (
        "interpolate",
        [Path("a")],
        {"out": "o", "pairs": 1, "walk_images": 3, "seed": 2, "spherical": True, "data_dir": "d"},
    ),
    ("dequant", [Path("a"), Path("b")], {"out": "o", "images": 4, "seed": 1, "data_dir": "d"}),
    ("concepts", None, {"out": "o", "probs": [0.5, 0.25, 0.25], "seed": 5}),
    ("sample", [SHIPPED], {"digit": "all", "n": 10, "seed": 0, "out": Path("o/digits.png")}),
    ("ood", [Path("a")], {"in_data": "i", "ood_data": "o", "split": "val", "ood_split": "test", "max_images": 9}),
    ("ood", [SHIPPED], {"ood_data": "o", "batch_sizes": [1, 5], "out": "o/ood.png"}),
    ("report", [SHIPPED], {"out": "o", "n": 4, "pairs": 1, "images": 4, "probs": [0.3, 0.7], "ood_images": 9}),
    ("report", [SHIPPED], {"out": "o", "walk_images": 3}),
]


@pytest.mark.parametrize("command, run_dirs, options", WRITTEN)
def test_written_command_lines_parse_to_their_options(command, run_dirs, options):
    """commands.argv spells options by argparse's rule; the real parser must read each back."""
    words = argv(command, **options) if run_dirs is None else runs_argv(command, run_dirs, **options)
    assert words[0] == "flowmnist" and shlex.split(shell_line(words)) == words
    ns = build_parser().parse_args(words[1:])
    assert ns.command == command
    for dest, value in options.items():
        assert getattr(ns, dest) == (str(value) if isinstance(value, Path) else value), dest
    if run_dirs is not None:
        paths = [str(r) for r in run_dirs if r != SHIPPED]
        assert (getattr(ns, "run_dirs", None) or [x for x in [getattr(ns, "run_dir", None)] if x]) == paths
        assert ns.pretrained in ((["simple"], "simple") if SHIPPED in run_dirs else (None,))


def test_one_name_per_command_and_one_meaning_per_option():
    """`sample` (one run) and `compare-samples` (several) are not one letter apart; --steps is train's step
    budget, while a walk's images and bench's timed steps have names of their own (--steps still reads
    there, left out of --help)."""
    commands = _subcommands()
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert "samples" not in sub.choices and not any(c + "s" in sub.choices for c in sub.choices)
    parse = build_parser().parse_args
    for command in ("interpolate", "report"):
        assert "--steps" not in commands[command].format_help()
        assert parse([command, "a", "--out", "o", "--steps", "5"]).walk_images == 5
        assert parse([command, "a", "--out", "o"]).walk_images == 8
    assert parse(["bench", "--steps", "2"]).timed_steps == 2 and parse(["bench"]).timed_steps == 5
    assert "--steps" not in commands["bench"].format_help() and "--steps" in commands["train"].format_help()


def test_argv_leaves_out_what_is_unset():
    words = argv("x", "a", b=None, c=False, d=[], e=True, f=0.5, g=[1, 2.0])
    assert words == ["flowmnist", "x", "a", "--e", "--f", "0.5", "--g", "1", "2"]


def test_figure_digits_come_from_each_runs_own_dataset(tmp_path, monkeypatch):
    """$FLOWMNIST_DATA holds MNIST: shipped runs keep their shipped digits, other runs use it for MNIST only."""
    from flowmnist.cli.common import figure_data

    monkeypatch.setenv("FLOWMNIST_DATA", str(tmp_path))
    parse = build_parser().parse_args
    shipped = figure_data(parse(["interpolate", "--pretrained", "simple", "fashion-multi-vardeq", "--out", "o"]))
    assert isinstance(shipped, dict) and set(shipped) == {"mnist", "fashion-mnist"}
    assert figure_data(parse(["interpolate", "runs/a", "--out", "o"])) == {"mnist": str(tmp_path.resolve())}
    given = parse(["interpolate", "--pretrained", "simple", "--out", "o", "--data-dir", "d"])
    assert figure_data(given) == str(Path("d").resolve())


def test_a_conditional_run_takes_its_classes_from_the_data(tmp_path, capsys):
    """A folder of three class folders trains a conditional model of three classes (saved in its config,
    a prior of three Gaussians) that evaluate scores as a 3-way classifier; one class is refused."""
    import json

    from conftest import real_data_or_skip
    from helpers import write_png

    from flowmnist.data import read_idx
    from flowmnist.runs import load_model, run_config

    root = real_data_or_skip()
    images, labels = (
        read_idx(root / "train-images-idx3-ubyte.gz")[:300],
        read_idx(root / "train-labels-idx1-ubyte.gz")[:300],
    )
    data = tmp_path / "three"
    for name, digit in (("zero", 0), ("one", 1), ("seven", 7)):
        (data / name).mkdir(parents=True)
        for i, image in enumerate(images[labels == digit][:12]):
            write_png(data / name / f"{i:02d}.png", image)
    run = str(tmp_path / "run")
    recipe = ["--model", "simple", "--steps", "2", "--batch-size", "8", "--no-compile", "--conditional"]
    assert main(["train", *recipe, "--data-dir", str(data), "--out", run]) == 0
    assert run_config(run).num_classes == 3 and load_model(run)[0].prior.num_classes == 3
    capsys.readouterr()
    assert main(["evaluate", run, "--split", "val", "--importance-samples", "1", "--timing-reps", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert len(r["confusion"]["val"]) == 3 and 0 <= r["accuracy"]["val"] <= 1

    for extra in ("one", "seven"):  # a single class left
        (data / extra).rename(tmp_path / extra)
    assert main(["train", *recipe, "--data-dir", str(data), "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "one class (zero); a conditional model needs two or more" in err, err
    assert not (tmp_path / "no").exists()


def test_a_run_on_mnist_padded_to_32x32_end_to_end(tmp_path, capsys, monkeypatch):
    """MNIST digits padded to 32x32 (as Bit-Swap trains on them) in a NumPy .npz: training records the
    size, evaluate, sample, interpolate and score work at it, compress records it in the file's header and
    decompress restores the bytes exactly. A run cannot resume on data of another size, and a model of
    one size refuses data of another in one line naming both."""
    import json

    import numpy as np
    from conftest import real_data_or_skip, write_mnist_dir
    from helpers import write_png

    import flowmnist.plots
    from flowmnist.codec import read_header
    from flowmnist.data import read_idx, write_idx
    from flowmnist.runs import run_config

    root = real_data_or_skip()
    padded = np.pad(read_idx(root / "train-images-idx3-ubyte.gz")[:96], ((0, 0), (2, 2), (2, 2)))
    data = tmp_path / "mnist32"
    data.mkdir()
    np.savez(data / "mnist32.npz", x_train=padded, y_train=read_idx(root / "train-labels-idx1-ubyte.gz")[:96])
    run = str(tmp_path / "run")
    recipe = ["--model", "simple", "--steps", "2", "--batch-size", "8", "--val-images", "8", "--no-compile"]
    assert main(["train", *recipe, "--data-dir", str(data), "--out", run]) == 0
    assert run_config(run).image_shape == (1, 32, 32)
    assert json.loads((Path(run) / "config.json").read_text())["image_shape"] == [1, 32, 32]
    capsys.readouterr()

    evaluate = ["evaluate", run, "--split", "val", "--max-images", "4", "--importance-samples", "1", "--timing-reps"]
    assert main([*evaluate, "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["images"] == {"val": 4} and 0 < r["bpd"]["val"] < 64 and r["roundtrip_exact"] == {"val": 1.0}

    drawn = []
    save_grid = flowmnist.plots.save_grid
    monkeypatch.setattr(flowmnist.plots, "save_grid", lambda x, *a, **k: drawn.append(x.shape) or save_grid(x, *a, **k))
    assert main(["sample", run, "--n", "4", "--out", str(tmp_path / "samples.png")]) == 0
    assert drawn == [(4, 1, 32, 32)] and (tmp_path / "samples.png").is_file()

    flat = tmp_path / "flat"  # unlabelled: a flat folder of PNGs
    flat.mkdir()
    for i, image in enumerate(padded[:12]):
        write_png(flat / f"{i:02d}.png", image)
    out = tmp_path / "walks"
    assert (
        main(["interpolate", run, "--data-dir", str(flat), "--pairs", "1", "--walk-images", "3", "--out", str(out)])
        == 0
    )
    assert (out / "interpolation.png").is_file()
    capsys.readouterr()
    assert main(["score", run, "--data-dir", str(flat), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert len(rows) == 2 and [row["label"] for row in rows] == [None, None] and all(row["bpd"] > 0 for row in rows)

    idx, packed, back = tmp_path / "four-idx3-ubyte", tmp_path / "four.fmz", tmp_path / "back-idx3-ubyte"
    write_idx(idx, padded[:2])
    assert main(["compress", run, str(idx), str(packed)]) == 0
    assert read_header(packed.read_bytes()).shape == (1, 32, 32) and b'"shape":[1,32,32]' in packed.read_bytes()
    assert main(["decompress", run, str(packed), str(back)]) == 0
    assert back.read_bytes() == idx.read_bytes()
    capsys.readouterr()

    mnist28 = str(write_mnist_dir(tmp_path / "mnist28", 24))
    refusals = [
        (["train", *recipe, "--data-dir", mnist28, "--out", run, "--resume"],
         f"{run}: cannot resume with image_shape=(1, 28, 28); the run has (1, 32, 32)"),
        (["train", *recipe, "--data-dir", str(data), "--out", str(tmp_path / "tuned"), "--init-from", "simple"],
         "--init-from simple: its model is 'simple' with image_shape=(1, 28, 28), this run's has image_shape=(1, 32"),
        ([*evaluate, "1", "--data-dir", mnist28], f"{mnist28}: images of 28x28 pixels, the model's are 32x32; use a"),
        (["evaluate", "--pretrained", "simple", "--data-dir", str(data), "--timing-reps", "1"],
         f"{data}: images of 32x32 pixels, the model's are 28x28; use a model trained on images of this size"),
        (["compress", "--pretrained", "simple", str(idx), str(tmp_path / "no.fmz")],
         f"{idx}: images of 32x32 pixels, the model's are 28x28"),
        (["decompress", "--pretrained", "simple", str(packed), str(tmp_path / "no-idx3-ubyte")],
         f"{packed}: holds images of 32x32 pixels, the model given codes 28x28"),
    ]  # fmt: skip
    for args, message in refusals:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err
    assert not (tmp_path / "no.fmz").exists() and not (tmp_path / "no-idx3-ubyte").exists()
