"""Figures of trained runs: the numbers behind each figure, and each CLI command's PNG."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import assert_png, png_size

from flowmnist.cli import main
from flowmnist.config import Config, FlowmnistError
from flowmnist.figures import (
    conditional_density,
    curve_series,
    dequant_samples,
    eval_images,
    flatness_z,
    interpolate,
    interpolate_latents,
    label_text,
    pick_pairs,
    plot_curves,
    run_labels,
    value_density,
)
from flowmnist.models import build_model
from flowmnist.runs import load_model

# --- labels and curves -------------------------------------------------------------------------


def test_run_labels_disambiguate_only_when_needed():
    assert run_labels(["simple", "vardeq"], ["a/r1", "b/r2"]) == ["simple", "vardeq"]
    assert run_labels(["simple", "simple", "vardeq"], ["a/r1", "b/r2", "c/r3"]) == [
        "simple (r1)",
        "simple (r2)",
        "vardeq",
    ]
    assert run_labels(["simple", "simple"], ["a/run", "b/run"]) == ["simple (a/run)", "simple (b/run)"]


def _fake_run(path, model: str, rows: list[tuple[int, str, float]], dataset: str = "mnist"):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(Config(model=model, dataset=dataset).to_dict()))
    lines = ["step,epoch,split,bpd,lr,seconds"] + [f"{s},0,{sp},{b},0.001,1.0" for s, sp, b in rows]
    (path / "metrics.csv").write_text("\n".join(lines) + "\n")
    return path


def test_curve_series_splits_rows_and_drops_nonfinite(tmp_path):
    rows = [(1, "train", 8.0), (2, "nonfinite", math.nan), (2, "train", 5.0), (2, "val", 4.5), (3, "train", math.inf)]
    run = _fake_run(tmp_path / "r", "vardeq", rows)
    (c,) = curve_series([run])
    assert c.label == "vardeq"
    assert c.train == ([1, 2], [8.0, 5.0])
    assert c.val == ([2], [4.5])


def test_curves_put_each_dataset_on_its_own_panel(tmp_path):
    """Fashion-MNIST's ~3 bpd on the MNIST runs' axes would squash the curves being compared."""
    rows = [(i, "train", 8 / i) for i in range(1, 5)] + [(4, "val", 1.5)]
    a, b = _fake_run(tmp_path / "a", "simple", rows), _fake_run(tmp_path / "b", "vardeq", rows)
    f = _fake_run(tmp_path / "f", "simple", rows, dataset="fashion-mnist")
    assert [c.dataset for c in curve_series([a, f])] == ["mnist", "fashion-mnist"]
    (one, _), (two, _) = (plot_curves(runs, tmp_path / str(len(runs))) for runs in ([a, b], [a, b, f]))
    assert png_size(two)[0] > 1.8 * png_size(one)[0]  # two panels side by side
    assert png_size(plot_curves([f, f], tmp_path / "ff")[0])[0] < 1.3 * png_size(one)[0]  # one dataset: one panel


def test_curve_series_refuses_a_non_run(tmp_path):
    with pytest.raises(FlowmnistError, match="metrics.csv"):
        curve_series([tmp_path])


def test_curves_command_overlays_runs(tmp_path, capsys):
    a = _fake_run(tmp_path / "a", "simple", [(i, "train", 8 / i) for i in range(1, 30)] + [(29, "val", 1.5)])
    b = _fake_run(tmp_path / "b", "simple", [(i, "train", 6 / i) for i in range(1, 20)])  # no val rows
    assert main(["curves", str(a), str(b), "--out", str(tmp_path / "out")]) == 0
    for name in ("train_log.png", "val_log.png"):
        assert_png(tmp_path / "out" / name)


# --- interpolation -----------------------------------------------------------------------------


@pytest.mark.parametrize("spherical", [False, True])
def test_interpolate_latents_ends_are_exact(spherical):
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(784, generator=g), torch.randn(784, generator=g)
    path = interpolate_latents(z0, z1, 8, spherical)
    assert path.shape == (8, 784)
    assert torch.equal(path[0], z0) and torch.equal(path[-1], z1)


def test_slerp_keeps_the_norm_linear_does_not():
    g = torch.Generator().manual_seed(1)
    z0, z1 = torch.randn(784, generator=g), torch.randn(784, generator=g)  # nearly orthogonal, |z| ~ 28
    mid_lin = interpolate_latents(z0, z1, 3)[1].norm()
    mid_sph = interpolate_latents(z0, z1, 3, spherical=True)[1].norm()
    ends = (z0.norm() + z1.norm()) / 2
    assert mid_lin < 0.8 * ends  # ~ 1/sqrt(2) of the ends: an atypical latent under the prior
    assert abs(mid_sph - ends) < 0.05 * ends


def test_slerp_falls_back_to_linear_for_parallel_latents():
    z0 = torch.ones(10)
    path = interpolate_latents(z0, 2 * z0, 5, spherical=True)
    assert torch.allclose(path, interpolate_latents(z0, 2 * z0, 5))
    with pytest.raises(ValueError):
        interpolate_latents(z0, z0, 1)


def test_pick_pairs_are_distinct_different_labels_and_seeded():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
    pairs = pick_pairs(labels, 3, seed=5)
    flat = [i for p in pairs for i in p]
    assert len(set(flat)) == 6
    assert all(labels[i] != labels[j] for i, j in pairs)
    assert pick_pairs(labels, 3, seed=5) == pairs
    with pytest.raises(FlowmnistError, match="interpolation pairs"):
        pick_pairs(labels, 6, seed=0)


def test_unlabelled_images_show_no_label_and_still_pair_up():
    """An unlabelled set (a flat folder of PNGs: every label data.NO_LABEL) shows "?", not -1, and its images
    pair up as a single-class set's do."""
    assert [label_text(y) for y in torch.tensor([3, -1, 0])] == ["3", "?", "0"]
    pairs = pick_pairs(torch.full((6,), -1), 3, seed=1)
    assert len({i for p in pairs for i in p}) == 6


def test_interpolation_endpoints_decode_to_the_inputs(tiny_run):
    model, cfg = load_model(tiny_run)
    images, labels, split = eval_images(cfg)
    assert split == "val"  # the test data has no t10k files
    for i, j in pick_pairs(labels, 2, seed=0):
        for spherical in (False, True):
            row = interpolate(model, images[i], images[j], steps=6, spherical=spherical)
            assert row.shape == (6, 1, 28, 28) and row.dtype == torch.uint8
            assert torch.equal(row[0], images[i]) and torch.equal(row[-1], images[j])
            assert not torch.equal(row[2], images[i])  # and the walk does move


def _perturbed(name: str, seed: int = 0):
    """An untrained model whose zero-initialised coupling outputs are randomised: not the identity."""
    torch.manual_seed(seed)
    model = build_model(name).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d) and not m.weight.abs().sum():
                m.weight.normal_(0, 0.05)
    return model


def test_interpolation_endpoints_exact_with_variational_multiscale_model(data_dir):
    from flowmnist.data import load_dir

    images = load_dir(data_dir).split("val")[0][:2]
    row = interpolate(_perturbed("multi-vardeq"), images[0], images[1], steps=4)
    assert torch.equal(row[0], images[0]) and torch.equal(row[-1], images[1])


# --- dequantization ----------------------------------------------------------------------------


def test_flatness_z_tells_flat_from_shaped():
    rng = np.random.default_rng(0)
    u = rng.random(40_000)
    assert flatness_z(u) < 4.5
    assert flatness_z(u**1.2) > 20  # a mild tilt is already many standard deviations off


def test_value_density_is_normalised_by_all_values():
    v = np.array([0.1, 0.2, 0.6, 3.5])
    edges, dens = value_density(v, 0, 1, 10)
    assert np.isclose((dens * np.diff(edges)).sum(), 3 / 4)  # three of the four values lie in [0, 1)
    edges, dens = conditional_density(np.array([0.05, 0.95]), bins=2)
    assert np.allclose(dens, [1.0, 1.0])


def test_uniform_dequantization_histogram_is_flat(tiny_run):
    model, cfg = load_model(tiny_run)
    images = eval_images(cfg)[0][:32]
    x, u = dequant_samples(model, images, draws=2, seed=0)
    assert len(x) == len(u) == 2 * 32 * 784
    assert np.array_equal(x[: 32 * 784], images.flatten().numpy())
    assert u.min() >= 0 and u.max() < 1
    zero = u[x == 0]
    assert len(zero) > 10_000
    assert flatness_z(zero) < 5, "uniform dequantization should give a flat q(u|x = 0)"
    edges, dens = conditional_density(zero, bins=20)
    assert np.all(np.abs(dens - 1) < 0.15)


def test_variational_dequantization_histogram_is_not_flat(data_dir):
    from flowmnist.data import load_dir

    model = _perturbed("vardeq")
    x, u = dequant_samples(model, load_dir(data_dir).split("val")[0][:16])
    assert flatness_z(u[x == 0]) > 10  # the same statistic sees a learned (here: random) shape


# --- the commands on a trained run -------------------------------------------------------------


def test_figure_commands_write_pngs(tiny_run, tmp_path, capsys):
    out = tmp_path / "figs"
    run = str(tiny_run)
    assert main(["compare-samples", run, run, "--out", str(out), "--n", "16"]) == 0
    assert main(["interpolate", run, "--out", str(out), "--pairs", "2", "--walk-images", "5"]) == 0
    assert main(["interpolate", run, "--out", str(out), "--pairs", "1", "--steps", "5", "--spherical"]) == 0
    assert main(["dequant", run, "--out", str(out), "--images", "16"]) == 0
    assert main(["curves", run, "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    names = sorted(p.rsplit("/", 1)[-1] for p in printed)
    assert names == sorted(
        [
            "samples.png",
            "interpolation.png",
            "interpolation_spherical.png",
            "dequant_simple.png",
            "train_log.png",
            "val_log.png",
        ]
    )
    for p in printed:
        assert_png(p)


def test_figure_commands_fail_in_one_line(tmp_path, capsys):
    assert main(["compare-samples", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flowmnist compare-samples: error:") and "\n" not in err
    (tmp_path / "file").write_text("")
    assert main(["curves", str(tmp_path), "--out", str(tmp_path / "file")]) == 2
    assert "not a directory" in capsys.readouterr().err
