"""OOD scores and metrics (flowmnist.ood), and the `score` and `ood` commands."""

from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic_digits, write_mnist_dir
from helpers import assert_png, write_png
from PIL import Image

from flowmnist import ood
from flowmnist.cli import main
from flowmnist.config import Config, FlowmnistError
from flowmnist.data import FILES, load_dir, write_idx
from flowmnist.evaluate import dataset_bpd, load_model

# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------

IN, OUT = [1, 2, 3, 3], [3, 4, 2]  # ties between the sets at 2 and 3


def test_auroc_by_hand_with_ties():
    # pairs (out > in) + ½ (out == in): o=3: 2 + ½·2, o=4: 4, o=2: 1 + ½  ->  8.5 of 12
    assert ood.auroc(IN, OUT) == pytest.approx(8.5 / 12, abs=1e-12)
    assert ood.auroc([0, 1], [2, 3]) == 1.0 and ood.auroc([2, 3], [0, 1]) == 0.0
    assert ood.auroc([5, 5, 5], [5, 5]) == 0.5


def test_aupr_by_hand_ties_are_one_threshold():
    # thresholds 4, 3, 2, 1: (TP, FP) = (1, 0), (2, 2), (3, 3), (3, 4); recall steps 1/3, 1/3, 1/3, 0
    # AP = 1/3·1 + 1/3·(2/4) + 1/3·(3/6) = 2/3. (Breaking the tie at 3 OOD-first would give 0.7.)
    assert ood.aupr(IN, OUT) == pytest.approx(2 / 3, abs=1e-12)
    assert ood.aupr([0, 1], [2, 3]) == 1.0
    assert ood.aupr([5, 5, 5], [5]) == pytest.approx(1 / 4)  # all tied: precision m/(n+m) at recall 1


def test_fpr_at_tpr_by_hand():
    out = np.arange(1, 21)  # 95% of 20 = 19 detected: threshold = the 19th largest = 2
    assert ood.fpr_at_tpr([0, 1, 2, 2, 3, 5], out) == pytest.approx(4 / 6)  # in-scores tied at 2 count
    assert ood.fpr_at_tpr([5, 4], [5, 5, 5, 1], tpr=0.5) == 0.5  # threshold 5 (tied OOD scores)
    assert ood.fpr_at_tpr([0, 1, 5, 9], [3, 7]) == 0.5  # ⌈0.95·2⌉ = 2: threshold 3 (⌊⌋ would give 7)
    assert ood.fpr_at_tpr([0, 1, 5, 9], [3, 7], tpr=0.5) == 0.25  # threshold 7
    assert ood.fpr_at_tpr([0, 1, 2], [1, 2], tpr=1.0) == pytest.approx(2 / 3)


def _brute(a, b):
    """The definitions, spelled out pair by pair and threshold by threshold."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    au = np.mean([(o > i) + 0.5 * (o == i) for o in b for i in a])
    ap, prev = 0.0, 0.0
    for t in sorted(set(a) | set(b), reverse=True):
        tp, fp = np.sum(b >= t), np.sum(a >= t)
        ap += (tp / len(b) - prev) * tp / (tp + fp)
        prev = tp / len(b)
    t = max(t for t in b if np.mean(b >= t) >= 0.95)
    return au, ap, np.mean(a >= t)


def test_metrics_match_their_definitions_on_tied_random_scores():
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 6, 37), rng.integers(2, 9, 23)
    got = ood.ood_metrics(a, b)
    assert [got["auroc"], got["aupr"], got["fpr95"]] == pytest.approx(list(_brute(a, b)), abs=1e-12)


def test_same_distribution_is_chance():
    rng = np.random.default_rng(0)
    m = ood.ood_metrics(rng.normal(size=2000), rng.normal(size=2000))
    assert abs(m["auroc"] - 0.5) < 0.05 and abs(m["aupr"] - 0.5) < 0.05 and abs(m["fpr95"] - 0.95) < 0.05
    # heavy ties: only the ½ for ties keeps this at chance (counting ties as 0 gives about 0.4)
    assert abs(ood.auroc(rng.integers(0, 5, 2000), rng.integers(0, 5, 2000)) - 0.5) < 0.05


def test_metrics_refuse_nan_and_empty_sets():
    with pytest.raises(FlowmnistError, match="NaN"):
        ood.auroc([0.1, float("nan")], [1.0])
    with pytest.raises(FlowmnistError, match="both sets"):
        ood.aupr([], [1.0])


# ----------------------------------------------------------------------------------------------
# Complexity (PNG code length)
# ----------------------------------------------------------------------------------------------


def test_complexity_black_image_far_below_noise():
    black = np.zeros((1, 1, 28, 28), np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (1, 1, 28, 28), dtype=np.uint8)
    c_black, c_noise = ood.complexity_bpd(black)[0], ood.complexity_bpd(noise)[0]
    assert c_black < 1.0 < 8.0 < c_noise  # noise does not compress: 8 bits a pixel plus the framing
    assert c_noise > 8 * c_black


def test_png_code_is_lossless_and_counted_whole():
    digit = synthetic_digits(1, seed=3)[0][0]
    data = ood.png_encode(digit)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(ood.png_decode(data), digit)
    assert ood.complexity_bpd(torch.from_numpy(digit)[None, None])[0] == 8 * len(data) / 784
    # the docstring's framing: everything but the IDAT payload is 57 bytes
    pos, payload = 8, 0
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        payload += n if data[pos + 4 : pos + 8] == b"IDAT" else 0
        pos += 12 + n
    assert len(data) - payload == 57


# ----------------------------------------------------------------------------------------------
# Typicality
# ----------------------------------------------------------------------------------------------


def test_typicality_split_is_disjoint_seeded_and_covers_the_set():
    ref, scored = ood.typicality_split(101, seed=0)
    assert len(ref) == 50 and len(scored) == 51
    assert not set(ref) & set(scored) and sorted(set(ref) | set(scored)) == list(range(101))
    assert all(np.array_equal(u, v) for u, v in zip(ood.typicality_split(101, 0), (ref, scored), strict=True))
    assert not np.array_equal(ood.typicality_split(101, 1)[0], ref)


def test_typicality_scores_use_the_held_out_half_only():
    n = 11
    bpd = np.arange(n, dtype=float) * 1.5  # all distinct: any image in both halves would show
    inside = {"bpd": bpd, "corrected": bpd - 1}
    outside = {"bpd": np.array([20.0, 21, 22, 23, 24]), "corrected": np.zeros(5)}
    ins, outs, info = ood.ood_scores(inside, outside, batch_sizes=(1, 4), seed=0)
    ref, scored = ood.typicality_split(n, 0)
    h = bpd[ref].mean()
    assert info == {"entropy_bpd": pytest.approx(h), "reference_images": 5, "scored_in_images": 6}
    np.testing.assert_allclose(ins["typicality-1"], np.abs(bpd[scored] - h))
    assert not set(bpd[scored]) & set(bpd[ref])
    # batches of 4: one batch from the 6 scored images (2 dropped), one from the 5 OOD images
    np.testing.assert_allclose(ins["typicality-4"], [abs(bpd[scored[:4]].mean() - h)])
    np.testing.assert_allclose(outs["typicality-4"], [abs(21.5 - h)])
    assert list(ins) == ["bpd", "corrected", "typicality-1", "typicality-4"]
    np.testing.assert_array_equal(ins["corrected"], bpd - 1)
    with pytest.raises(FlowmnistError, match="batch size 7 needs at least 7"):
        ood.ood_scores(inside, outside, batch_sizes=(7,))


# ----------------------------------------------------------------------------------------------
# A tiny trained model separates noise from digits
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ood_data(tmp_path_factory) -> Path:
    """120 synthetic digits (100 train / 20 val)."""
    return write_mnist_dir(tmp_path_factory.mktemp("ood") / "data", 120)


@pytest.fixture(scope="module")
def ood_run(ood_data) -> Path:
    """A `simple` model after 25 steps of 4 synthetic digits (a few seconds on one core). Unlike the
    shared tiny_run (12 steps, all inside the LR warm-up, on real digits when they are present) it
    already tells its digits from noise and from inverted digits by bpd."""
    from flowmnist.train import train

    run = ood_data.parent / "run"
    cfg = Config(model="simple", data_dir=str(ood_data), epochs=1, batch_size=4, warmup_steps=5, compile=False)
    train(cfg, run, progress=False)
    return run


def test_tiny_model_separates_noise_and_inverted_digits(ood_run, ood_data):
    model, cfg = load_model(ood_run)
    digits = load_dir(ood_data, cfg.split_seed, cfg.val_fraction).split("val")[0]  # held out from training
    noise = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (40, 1, 28, 28), dtype=np.uint8))
    inside, outside = ood.score_images(model, digits, k=2), ood.score_images(model, noise, k=2)
    ins, outs, _ = ood.ood_scores(inside, outside, batch_sizes=(1, 5))
    for name in ("bpd", "corrected", "typicality-1", "typicality-5"):
        assert ood.auroc(ins[name], outs[name]) > 0.95, name
    assert ood.fpr_at_tpr(ins["bpd"], outs["bpd"]) < 0.1
    inverted = ood.score_images(model, 255 - digits, k=2)
    assert ood.auroc(inside["bpd"], inverted["bpd"]) > 0.9
    # seeded: the same images score the same; the bpd is the evaluate command's
    again = ood.score_images(model, digits, k=2)
    assert np.array_equal(again["bpd"], inside["bpd"])
    assert inside["bpd"].mean() == pytest.approx(dataset_bpd(model, digits, k=2)[0], abs=1e-9)


# ----------------------------------------------------------------------------------------------
# `flowmnist score`
# ----------------------------------------------------------------------------------------------


def _one_line_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_score_a_data_directory_to_csv(ood_run, tiny_data, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    assert (
        main(["score", str(ood_run), "--data-dir", str(tiny_data), "--importance-samples", "2", "--out", str(out)]) == 0
    )
    assert capsys.readouterr().out.strip() == str(out)
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["index", "label", "bpd", "complexity_bpd", "corrected"]
    model, cfg = load_model(ood_run)
    images, labels = load_dir(tiny_data, cfg.split_seed, cfg.val_fraction).split("val")
    assert [int(r["index"]) for r in rows] == list(range(len(images))) == list(range(8))
    assert [int(r["label"]) for r in rows] == labels.tolist()
    bpd = np.array([float(r["bpd"]) for r in rows])
    comp = np.array([float(r["complexity_bpd"]) for r in rows])
    assert bpd.mean() == pytest.approx(dataset_bpd(model, images, k=2)[0], abs=1e-5)
    np.testing.assert_allclose(comp, ood.complexity_bpd(images), atol=1e-6)
    np.testing.assert_allclose([float(r["corrected"]) for r in rows], bpd - comp, atol=2e-6)


def test_score_png_files_and_directories(ood_run, tmp_path, capsys):
    digits = synthetic_digits(3, seed=7)[0]
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for name, img in zip(("b.png", "a.png", "c.PNG"), digits, strict=True):
        write_png(pngs / name, img)
    (pngs / "notes.txt").write_text("not an image")
    assert main(["score", str(ood_run), "--png", str(pngs), "--importance-samples", "2", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in doc["rows"]] == [str(pngs / n) for n in ("a.png", "b.png", "c.PNG")]
    model, _ = load_model(ood_run)
    expect = ood.score_images(model, torch.from_numpy(digits[[1, 0, 2]]).unsqueeze(1), k=2)
    np.testing.assert_allclose([r["bpd"] for r in doc["rows"]], expect["bpd"], atol=1e-6)
    np.testing.assert_allclose([r["corrected"] for r in doc["rows"]], expect["corrected"], atol=1e-6)
    # files in the order given; --max-images keeps the first
    out = tmp_path / "s.json"
    argv = ["score", str(ood_run), "--png", str(pngs / "c.PNG"), str(pngs / "a.png"), "--max-images", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    assert [r["label"] for r in json.loads(out.read_text())["rows"]] == [str(pngs / "c.PNG")]


def test_score_bad_png_is_one_line_without_traceback(ood_run, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("this is not a PNG\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "flowmnist", "score", str(ood_run), "--png", str(bad)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    assert p.stderr.startswith("flowmnist score: error: ") and f"{bad}: not a readable PNG" in p.stderr


def test_score_input_errors_name_the_file(ood_run, tiny_data, tmp_path, capsys):
    run = str(ood_run)
    small = write_png(tmp_path / "small.png", np.zeros((28, 27), np.uint8))  # 27 wide, 28 high
    _one_line_error(
        capsys, main(["score", run, "--png", str(small)]), "small.png: images of 27x28 pixels, the model's are 28x28"
    )
    jpeg = tmp_path / "photo.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(jpeg, format="JPEG")
    _one_line_error(capsys, main(["score", run, "--png", str(jpeg)]), "photo.png: a JPEG image, not a PNG")
    cut = tmp_path / "cut.png"
    cut.write_bytes(ood.png_encode(synthetic_digits(1)[0][0])[:60])
    _one_line_error(capsys, main(["score", run, "--png", str(cut)]), "cut.png: ")
    deep = tmp_path / "deep.png"
    Image.fromarray(np.zeros((28, 28), np.uint16)).save(deep)
    _one_line_error(capsys, main(["score", run, "--png", str(deep)]), "deep.png: pixel mode I;16")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(capsys, main(["score", run, "--png", str(empty)]), f"{empty}: no .png files")
    _one_line_error(capsys, main(["score", run, "--png", str(tmp_path / "gone")]), "gone: no such file")
    bad_out = ["score", run, "--data-dir", str(tiny_data), "--out", str(tmp_path / "x.txt")]
    _one_line_error(capsys, main(bad_out), "--out", "x.txt: must end in .csv or .json")
    split_png = ["score", run, "--png", str(small), "--split", "test"]
    _one_line_error(capsys, main(split_png), "--split applies to --data-dir")
    no_test = write_mnist_dir(tmp_path / "no_t10k", 24)
    _one_line_error(capsys, main(["score", run, "--data-dir", str(no_test), "--split", "test"]), "t10k-images")


# ----------------------------------------------------------------------------------------------
# `flowmnist ood`
# ----------------------------------------------------------------------------------------------


def _noise_dir(root: Path, n_train: int, n_test: int) -> Path:
    """An IDX directory of uniform-noise images, with t10k files when n_test > 0."""
    rng = np.random.default_rng(5)
    root.mkdir(parents=True)
    write_idx(root / (FILES["train-images"][0] + ".gz"), rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8))
    write_idx(root / (FILES["train-labels"][0] + ".gz"), np.zeros(n_train, np.uint8))
    if n_test:
        write_idx(root / (FILES["test-images"][0] + ".gz"), rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8))
        write_idx(root / (FILES["test-labels"][0] + ".gz"), np.zeros(n_test, np.uint8))
    return root


def test_ood_test_split_json_and_figure(ood_run, tmp_path, capsys):
    inside = write_mnist_dir(tmp_path / "in", 24, n_test=12, seed=3)
    noise = _noise_dir(tmp_path / "noise", 24, n_test=10)
    argv = ["ood", str(ood_run), "--in-data", str(inside), "--ood-data", str(noise), "--split", "test"]
    argv += ["--importance-samples", "2", "--batch-sizes", "1", "3", "--out", str(tmp_path / "ood.png")]
    assert main([*argv, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert list(r["scores"]) == ["bpd", "corrected", "typicality-1", "typicality-3"]
    assert r["in"]["images"] == 12 and r["ood"]["images"] == 10 and r["split"] == "test"
    assert r["in"]["split"] == r["ood"]["split"] == "test"
    assert r["in"]["data_dir"] == str(inside.resolve()) and r["ood"]["data_dir"] == str(noise.resolve())
    assert r["typicality"]["reference_images"] == 6 and r["typicality"]["scored_in_images"] == 6
    assert r["ood"]["mean_bpd"] > r["in"]["mean_bpd"] + 1
    assert r["scores"]["bpd"]["auroc"] > 0.9 and r["scores"]["bpd"]["fpr95"] < 0.5
    for m in r["scores"].values():
        assert 0 <= m["auroc"] <= 1 and 0 <= m["aupr"] <= 1 and 0 <= m["fpr95"] <= 1
    assert_png(r["figure"], min_w=400, min_h=200) and r["figure"] == str(tmp_path / "ood.png")
    # the OOD set's own split; the in-distribution set defaults to the run's data (24 train images: 4 val)
    argv2 = ["ood", str(ood_run), "--ood-data", str(noise), "--ood-split", "test", "--importance-samples", "1"]
    assert main([*argv2, "--batch-sizes", "1", "--json"]) == 0
    r2 = json.loads(capsys.readouterr().out)
    assert (r2["in"]["split"], r2["ood"]["split"], r2["ood"]["images"]) == ("val", "test", 10)
    assert r2["in"]["data_dir"] == str(Path(json.loads((ood_run / "config.json").read_text())["data_dir"]).resolve())
    # the Markdown table by default, with the same numbers
    assert main(argv[:-2]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| score | AUROC | AUPR | FPR95 |")
    assert f"| bpd | {r['scores']['bpd']['auroc']:.4f} |" in table and "12 images" in table


def test_report_ood_section(ood_run, tmp_path, capsys):
    import html
    import shlex

    from flowmnist.report import build_report

    noise = _noise_dir(tmp_path / "noise", 24, n_test=10)
    figs = ["--n", "4", "--pairs", "1", "--steps", "3", "--images", "4"]
    assert main(["report", str(ood_run), "--out", str(tmp_path / "report"), *figs, "--ood-data", str(noise)]) == 0
    text = (tmp_path / "report" / "index.html").read_text()
    capsys.readouterr()
    assert "<h2>Out-of-distribution scores</h2>" in text and "<td>typicality-10</td>" in text
    assert "<td>typicality-25</td>" not in text  # only batch sizes that 10 scored images fill
    assert "20 of its val images" in text and "10 test images of" in text  # --ood-images 500 caps neither
    assert_png(tmp_path / "report" / "ood_simple.png", min_w=400, min_h=200)
    assert f"--ood-data {noise} --ood-images 500" in text  # in the report's own command
    # the section's stand-alone command gives the numbers of its table
    (cmd,) = [ln for ln in html.unescape(text).splitlines() if ln.startswith("flowmnist ood ")]
    assert main([*shlex.split(cmd)[1:], "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["in"]["split"], r["ood"]["split"], r["ood"]["images"]) == ("val", "test", 10)
    for name, m in r["scores"].items():
        assert f'<td>{name}</td><td class="num">{m["auroc"]}</td>' in text, name
    figs = {"samples": 4, "pairs": 1, "steps": 3, "dequant_images": 4}
    assert "Out-of-distribution" not in build_report([ood_run], tmp_path / "r2", **figs).read_text()


def test_ood_test_split_needs_t10k_in_both(ood_run, tmp_path, capsys):
    inside = write_mnist_dir(tmp_path / "in", 24, n_test=12)
    noise = _noise_dir(tmp_path / "noise", 24, n_test=0)
    argv = ["ood", str(ood_run), "--in-data", str(inside), "--ood-data", str(noise), "--split", "test"]
    _one_line_error(capsys, main(argv), str(noise.resolve()), "t10k-images-idx3-ubyte")
    too_big = ["ood", str(ood_run), "--in-data", str(inside), "--ood-data", str(inside), "--batch-sizes", "50"]
    _one_line_error(capsys, main(too_big), "typicality batch size 50")


def test_scores_table_formats_or_keeps_the_stored_values():
    scores = {"bpd": {"auroc": 0.5, "aupr": 0.123456, "fpr95": 1.0}, "corrected": {"auroc": 0.9, "aupr": 1, "fpr95": 0}}
    four = ood.scores_table(scores).splitlines()
    assert four[:2] == ["| score | AUROC | AUPR | FPR95 |", "|---|---:|---:|---:|"]
    assert four[2] == "| bpd | 0.5000 | 0.1235 | 1.0000 |" and four[3].startswith("| corrected | 0.9000 |")
    assert ood.scores_table(scores, digits=None).splitlines()[2] == "| bpd | 0.5 | 0.123456 | 1.0 |"
