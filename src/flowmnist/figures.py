"""Figures of trained runs: training curves, sample grids, latent interpolations, dequantization; for
class-conditional runs the digits on demand and the classifier's confusion matrix.

Each figure has a function computing its numbers (unit-tested on their own) and a ``plot_*``
function that draws them and writes PNGs through ``plots.save_figure`` (Agg backend, atomic write).
Every ``plot_*`` of runs takes their directories, or the runs loaded once (``load_runs``: model, config,
label and held-out digits in a ``LoadedRun``, as the report passes them to every figure), and an output
folder, and returns the paths it wrote.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from torch import Tensor

from .config import Config, FlowmnistError
from .evaluate import own_samples
from .models import FlowModel
from .plots import image_grid, plt, save_figure, save_grid
from .runs import load_model, read_metrics, run_config, run_title

# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------


def file_slug(label: str) -> str:
    """A label as part of a file name: "multi-vardeq (conditional)" -> "multi-vardeq_conditional"."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", label).strip("_")


def config_labels(cfgs: list[Config], run_dirs: list[str | Path]) -> list[str]:
    """``run_labels`` of the runs' titles (``runs.run_title``: conditional and dataset noted)."""
    return run_labels([run_title(c.model, c.conditional, c.dataset) for c in cfgs], run_dirs)


def run_labels(models: list[str], run_dirs: list[str | Path]) -> list[str]:
    """Legend names: the model name alone when it is unique among the runs, else "model (dir)";
    the full path when even the directory names collide."""
    counts = Counter(models)
    names = [Path(r).name for r in run_dirs]
    name_counts = Counter(zip(models, names, strict=True))
    labels = []
    for m, n, r in zip(models, names, run_dirs, strict=True):
        if counts[m] == 1:
            labels.append(m)
        elif name_counts[(m, n)] == 1:
            labels.append(f"{m} ({n})")
        else:
            labels.append(f"{m} ({r})")
    return labels


DataDirs = str | dict[str, str] | None  # one directory for every run, or one per dataset name


def eval_images(cfg: Config, data_dir: DataDirs = None) -> tuple[Tensor, Tensor, str]:
    """Real digits for a run: (images, labels, split), its held-out split (``ImageSplits.held_out``; never
    train: the figures should show what the model does on digits it did not fit).
    ``data_dir``: a directory, {dataset: directory} (the run's dataset's), or None (the run's own)."""
    from .data import load_data

    if isinstance(data_dir, dict):
        data_dir = data_dir.get(cfg.dataset)
    data = load_data(cfg, data_dir)
    images, labels = data.split(data.held_out)
    return images, labels, data.held_out


@dataclass
class LoadedRun:
    """A run as the figures and the report show it, loaded once: its model (eval mode, on the figures'
    device), config, legend label, and its dataset's held-out digits (read on first use)."""

    path: Path
    model: FlowModel
    cfg: Config
    label: str
    data_dir: DataDirs = None

    @cached_property
    def digits(self) -> tuple[Tensor, Tensor, str]:
        """(images, labels, split): ``eval_images`` of the run."""
        return eval_images(self.cfg, self.data_dir)

    @property
    def split(self) -> str:
        return self.digits[2]


Runs = Sequence[str | Path] | Sequence[LoadedRun]  # what a figure takes: run directories, or runs loaded


def load_runs(runs: Runs, data_dir: DataDirs = None, device: str = "cpu") -> list[LoadedRun]:
    """Each run loaded once (runs already loaded pass through), labelled among the others (``config_labels``)."""
    runs = list(runs)
    if all(isinstance(r, LoadedRun) for r in runs):
        return runs
    loaded = [load_model(r, device) for r in runs]
    labels = config_labels([cfg for _, cfg in loaded], runs)
    return [LoadedRun(Path(r), m, cfg, lb, data_dir) for r, (m, cfg), lb in zip(runs, loaded, labels, strict=True)]


# ----------------------------------------------------------------------------------------------
# 1. Training curves
# ----------------------------------------------------------------------------------------------


@dataclass
class Curves:
    """One run's logged bpd: (step, bpd) pairs per split, non-finite rows dropped."""

    label: str
    dataset: str = "mnist"
    train: tuple[list[int], list[float]] = field(default_factory=lambda: ([], []))
    val: tuple[list[int], list[float]] = field(default_factory=lambda: ([], []))


def curve_series(run_dirs: list[str | Path]) -> list[Curves]:
    """Read each run's metrics.csv into train and val (step, bpd) series, labelled by model."""
    cfgs, rows_per_run = [], []
    for run in run_dirs:
        if not (Path(run) / "metrics.csv").is_file():
            raise FlowmnistError(f"{run}: no metrics.csv; not a flowmnist run directory")
        cfgs.append(run_config(run))
        rows_per_run.append(read_metrics(run))
    out = []
    for label, cfg, rows in zip(config_labels(cfgs, run_dirs), cfgs, rows_per_run, strict=True):
        c = Curves(label, cfg.dataset)
        for r in rows:
            # 'nonfinite' rows record skipped steps; NaN/inf would break the axis limits.
            if r["split"] in ("train", "val") and math.isfinite(r["bpd"]):
                series = c.train if r["split"] == "train" else c.val
                series[0].append(r["step"])
                series[1].append(r["bpd"])
        out.append(c)
    return out


def _curves_panel(ax, series: list[tuple[int, Curves]], split: str, title: str) -> None:
    """One dataset's runs on one axes (each run's colour by its index among all runs)."""
    values = []
    for i, c in series:
        steps, bpd = getattr(c, split)
        values += bpd
        label = c.label if bpd else f"{c.label} (no {split} rows)"
        # A single point (e.g. one validation) is invisible as a line: give it a marker.
        ax.plot(steps, bpd, color=f"C{i % 10}", label=label, marker="o" if len(bpd) < 20 else None, ms=3)
    # bpd falls from ~8 at initialisation to ~1: a log axis keeps both ends readable.
    if values and min(values) > 0 and max(values) / min(values) > 3:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))  # 2, 5, 10 rather than 2x10^0
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("step")
    ax.set_ylabel(f"{split} bits per dimension")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


def plot_curves(run_dirs: list[str | Path], out_dir: str | Path) -> list[Path]:
    """train_log.png and val_log.png: bpd vs step, one colour per run (the same in both files) and one
    panel per dataset, since their bpd differ by far more than the runs of one dataset do."""
    from .data import get_dataset

    series = list(enumerate(curve_series(run_dirs)))
    datasets = list(dict.fromkeys(c.dataset for _, c in series))
    paths = []
    for split in ("train", "val"):
        fig, axes = plt.subplots(1, len(datasets), figsize=(6.4 * len(datasets), 4), squeeze=False)
        for ax, dataset in zip(axes[0], datasets, strict=True):
            title = f"{split} bpd" + (f", {get_dataset(dataset).title}" if len(datasets) > 1 else "")
            _curves_panel(ax, [(i, c) for i, c in series if c.dataset == dataset], split, title)
        paths.append(save_figure(fig, Path(out_dir) / f"{split}_log.png"))
    return paths


# ----------------------------------------------------------------------------------------------
# 2. Sample grids side by side
# ----------------------------------------------------------------------------------------------


def plot_samples(
    run_dirs: Runs,
    out_dir: str | Path,
    n: int = 36,
    seed: int = 0,
    temperature: float = 1.0,
    device: str = "cpu",
) -> list[Path]:
    """samples.png (samples_T<T>.png at another temperature): each run's grid of n samples in one row
    of panels, from the same seed."""
    loaded = load_runs(run_dirs, device=device)
    fig, axes = plt.subplots(1, len(loaded), figsize=(3.2 * len(loaded), 3.6), squeeze=False)
    for ax, run in zip(axes[0], loaded, strict=True):
        g = torch.Generator(device=run.model.device).manual_seed(seed)
        grid = image_grid(run.model.sample(n, temperature, g))
        ax.imshow(grid, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(run.label, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"samples (T={temperature:g}, seed {seed})")
    name = "samples.png" if temperature == 1 else f"samples_T{temperature:g}.png"
    return [save_figure(fig, Path(out_dir) / name)]


# ----------------------------------------------------------------------------------------------
# 3. Interpolation in latent space
# ----------------------------------------------------------------------------------------------


def interpolate_latents(z0: Tensor, z1: Tensor, steps: int, spherical: bool = False) -> Tensor:
    """Points from z0 to z1 (both ends included), shape (steps, D).

    linear:    z(t) = (1 - t) z0 + t z1
    spherical: z(t) = sin((1 - t) W) / sin W * z0 + sin(t W) / sin W * z1,  cos W = <z0, z1> / (|z0| |z1|)
    (slerp; Shoemake 1985, White 2016). Under the N(0, I) prior a linear midpoint has a norm well below
    the typical sqrt(D), i.e. an atypical latent; slerp keeps the norm near the endpoints'. Falls back to
    linear when z0 and z1 are (anti)parallel, where W = 0 or pi makes the formula undefined.
    At t = 0 and t = 1 both give z0 and z1 exactly (the weights are exactly 1 and 0).
    """
    if steps < 2:
        raise ValueError("steps must be at least 2 (the two endpoints)")
    t = torch.linspace(0, 1, steps, dtype=z0.dtype, device=z0.device).unsqueeze(1)
    z0, z1 = z0.flatten(), z1.flatten()
    if spherical:
        cos = torch.dot(z0, z1) / (z0.norm() * z1.norm())
        omega = torch.arccos(cos.clamp(-1, 1))
        if float(torch.sin(omega)) > 1e-6:
            return (torch.sin((1 - t) * omega) * z0 + torch.sin(t * omega) * z1) / torch.sin(omega)
    return (1 - t) * z0 + t * z1


def label_text(label) -> str:
    """A label as a figure or table shows it: the number, "?" for an unlabelled image (``data.NO_LABEL``)."""
    from .data import NO_LABEL

    return "?" if int(label) == NO_LABEL else str(int(label))


def pick_pairs(labels: Tensor, pairs: int, seed: int) -> list[tuple[int, int]]:
    """Index pairs of digits with different labels (a 3 -> 7 walk shows more than a 3 -> 3 one),
    chosen by a seeded permutation; the same seed and data give the same pairs for every run."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).tolist()
    out, used = [], set()
    for i in order:
        if len(out) == pairs:
            break
        if i in used:
            continue
        j = next((j for j in order if j not in used and j != i and labels[j] != labels[i]), None)
        if j is None:  # a single-class data set: any other image will do
            j = next((j for j in order if j not in used and j != i), None)
        if j is None:
            break
        used.update((i, j))
        out.append((i, j))
    if len(out) < pairs:
        raise FlowmnistError(f"need {2 * pairs} images for {pairs} interpolation pairs, the split has {len(labels)}")
    return out


@torch.no_grad()
def interpolate(model: FlowModel, x0: Tensor, x1: Tensor, steps: int = 8, spherical: bool = False) -> Tensor:
    """Encode two uint8 images (1, H, W), walk between their latents, decode: uint8 (steps, 1, H, W).

    Encoding uses the model's deterministic default noise, the dequantization base noise u0 = 1/2
    (for variational dequantization: the image of u0 = 1/2 under q's flow). So the figure depends on
    the seed only through the choice of digits, and the endpoints decode back to the inputs exactly:
    the continuous point sits mid-bin, away from the edges where float error could flip ``floor``.
    """
    z = model.encode(torch.stack([x0, x1]))
    return model.decode(interpolate_latents(z[0], z[1], steps, spherical))


def plot_interpolations(
    run_dirs: Runs,
    out_dir: str | Path,
    pairs: int = 2,
    steps: int = 8,
    seed: int = 0,
    spherical: bool = False,
    data_dir: DataDirs = None,
    device: str = "cpu",
) -> list[Path]:
    """interpolation.png (interpolation_spherical.png with ``spherical``): a row per (run, pair)."""
    rows, names = [], []
    for run in load_runs(run_dirs, data_dir, device):
        images, digit_labels, split = run.digits
        for i, j in pick_pairs(digit_labels, pairs, seed):
            rows.append(interpolate(run.model, images[i], images[j], steps, spherical).cpu())
            names.append(f"{run.label}\n{split} {label_text(digit_labels[i])}→{label_text(digit_labels[j])}")
    fig, axes = plt.subplots(len(rows), 1, figsize=(steps * 0.75 + 1.5, 0.85 * len(rows) + 0.5), squeeze=False)
    for ax, row, name in zip(axes[:, 0], rows, names, strict=True):
        ax.imshow(image_grid(row, nrow=steps), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    kind = "spherical" if spherical else "linear"
    fig.suptitle(f"{kind} latent interpolation, {steps} steps (seed {seed})", fontsize=10)
    name = "interpolation_spherical.png" if spherical else "interpolation.png"
    return [save_figure(fig, Path(out_dir) / name)]


# ----------------------------------------------------------------------------------------------
# 4. The dequantization distribution of a trained model
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def dequant_samples(
    model: FlowModel, images: Tensor, draws: int = 1, seed: int = 0, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """(x, u) over every pixel of ``images``, ``draws`` times: x the discrete value (int), u ~ q(u|x) in
    [0, 1) from ``model.dequant_noise(x, u0)`` with u0 ~ U[0,1) from a seeded generator. The
    continuous value the flow sees is v = x + u (pixel units; v / 256 in [0, 1) units)."""
    g = torch.Generator().manual_seed(seed)
    xs, us = [], []
    for _ in range(draws):
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size]
            u0 = torch.rand(x.shape, generator=g, dtype=torch.float64).to(model.dtype)
            u = model.dequant_noise(x, u0)
            xs.append(x.flatten().numpy().astype(np.int64))
            us.append(u.flatten().double().cpu().numpy())
    return np.concatenate(xs), np.concatenate(us)


def value_density(v: np.ndarray, lo: float, hi: float, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(edges, density) of v over [lo, hi), normalised by *all* values: density * width summed over
    the bins is the fraction of v inside the range, so a zoomed panel keeps the true heights."""
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    return edges, counts / (len(v) * (hi - lo) / bins)


def conditional_density(u: np.ndarray, bins: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """(edges, density) of u on [0, 1): the histogram estimate of q(u|x) for the given pixels
    (1 everywhere for uniform dequantization)."""
    counts, edges = np.histogram(u, bins=bins, range=(0.0, 1.0))
    return edges, counts / (max(len(u), 1) / bins)


def flatness_z(u: np.ndarray, bins: int = 20) -> float:
    """max_b |n_b - N/B| / sqrt(N/B): the largest standardised deviation of a bin count from a flat
    histogram (binomial counts ~ N(N/B, N/B) for many values). For truly uniform u it rarely
    exceeds 4 with 20 bins; any visible shape gives tens or hundreds."""
    counts, _ = np.histogram(u, bins=bins, range=(0.0, 1.0))
    expected = len(u) / bins
    return float(np.max(np.abs(counts - expected)) / math.sqrt(expected))


def dequant_groups(x: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Pixel groups for q(u|x): the two extremes MNIST is full of, and the rest pooled."""
    groups = [("x = 0", x == 0), ("x = 255", x == 255), ("x = 1..254", (x > 0) & (x < 255))]
    return [(name, mask) for name, mask in groups if mask.any()]


def plot_dequant(
    run_dirs: Runs,
    out_dir: str | Path,
    images: int = 64,
    draws: int = 1,
    seed: int = 0,
    data_dir: DataDirs = None,
    device: str = "cpu",
) -> list[Path]:
    """dequant_<label>.png per run: the distribution of v = x + u over real digits. Three panels:
    v in [0, 8) (the heavy mass at 0 and its neighbours), the whole range [0, 256) on a log density
    axis, and q(u|x) per pixel group (flat at 1 for uniform dequantization)."""
    paths = []
    for run in load_runs(run_dirs, data_dir, device):
        data, _, split = run.digits
        label = run.label
        x, u = dequant_samples(run.model, data[:images], draws, seed)
        v = x + u
        kind = "variational" if run.model.dequant.variational else "uniform"
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), layout="constrained")
        edges, dens = value_density(v, 0, 8, 8 * 16)
        axes[0].stairs(dens, edges, fill=True, alpha=0.6)
        axes[0].set_yscale("log")
        axes[0].set_xlim(0, 8)
        axes[0].set_title("low values, v in [0, 8)")
        edges, dens = value_density(v, 0, 256, 256 * 2)
        axes[1].stairs(dens, edges, fill=True, alpha=0.6)
        axes[1].set_yscale("log")
        axes[1].set_xlim(0, 256)
        axes[1].set_title("whole range, v in [0, 256)")
        for ax in axes[:2]:
            ax.set_xlabel("v = x + u (pixel units; /256 for [0,1))")
            ax.set_ylabel("density (log)")
        for i, (name, mask) in enumerate(dequant_groups(x)):
            edges, dens = conditional_density(u[mask], bins=40)
            axes[2].stairs(dens, edges, color=f"C{i}", lw=1.5, label=f"{name} ({mask.mean():.0%} of pixels)")
        axes[2].axhline(1.0, color="k", ls=":", lw=1, label="uniform")
        axes[2].set_xlim(0, 1)
        axes[2].set_ylim(bottom=0)
        axes[2].set_xlabel("u = v - x")
        axes[2].set_ylabel("density q(u|x)")
        axes[2].set_title("dequantization noise by pixel value")
        axes[2].legend(fontsize=7)
        fig.suptitle(f"{label}: {kind} dequantization, {min(images, len(data))} {split} digits x {draws} draw(s)")
        slug = file_slug(label)
        paths.append(save_figure(fig, Path(out_dir) / f"dequant_{slug}.png"))
    return paths


# ----------------------------------------------------------------------------------------------
# 5. OOD score histograms (flowmnist.ood)
# ----------------------------------------------------------------------------------------------


def plot_ood_histograms(
    inside: dict[str, np.ndarray],
    outside: dict[str, np.ndarray],
    path: str | Path,
    labels: tuple[str, str] = ("in-distribution", "OOD"),
    bins: int = 40,
) -> Path:
    """One panel per score (the keys of ``inside``): the two sets' histograms on shared bins, each
    normalised to density, higher = more OOD. Non-finite values are left out (the title counts them)."""
    names = list(inside)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        sets = [np.asarray(inside[name], dtype=np.float64), np.asarray(outside[name], dtype=np.float64)]
        finite = [v[np.isfinite(v)] for v in sets]
        dropped = sum(v.size - f.size for v, f in zip(sets, finite, strict=True))
        both = np.concatenate(finite)
        edges = np.histogram_bin_edges(both, bins=bins) if both.size else np.linspace(0, 1, bins + 1)
        for values, label in zip(finite, labels, strict=True):
            if values.size:
                ax.hist(values, bins=edges, density=True, alpha=0.5, label=f"{label} ({values.size})")
        ax.set_title(name + (f" ({dropped} non-finite left out)" if dropped else ""), fontsize=10)
        ax.set_xlabel("score (higher = more OOD)")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# 6. Class-conditional runs: digits on demand, the classifier's confusion matrix
# ----------------------------------------------------------------------------------------------


def digit_samples(model: FlowModel, n: int, temperature: float = 1.0, seed: int = 0) -> Tensor:
    """n samples of each digit 0-9 from a conditional model, digit by digit (``evaluate.own_samples``):
    uint8 (10 n, 1, H, W) on the CPU, so a grid of n columns has digit d in row d."""
    return own_samples(model, n, temperature, seed)[0]


def save_digit_grid(model: FlowModel, path: str | Path, name: str, n: int, temperature: float, seed: int) -> Path:
    """A 10-row PNG, row d: n samples of digit d (what `flowmnist sample --digit all` writes)."""
    title = f"{name}: digits 0-9, {n} each (T={temperature:g}, seed {seed})"
    return save_grid(digit_samples(model, n, temperature, seed), path, title=title, nrow=n)


def confusion_fractions(matrix) -> np.ndarray:
    """Each row of a confusion matrix (row: true class, column: predicted) divided by its sum: row d is
    the distribution of the predictions for digit d's images (0 where a digit has no images)."""
    m = np.asarray(matrix, dtype=np.float64)
    sums = m.sum(axis=1, keepdims=True)
    return np.divide(m, sums, out=np.zeros_like(m), where=sums > 0)


def plot_confusion(matrix, path: str | Path, title: str) -> Path:
    """The confusion matrix as a heat map of the row fractions, each cell labelled with its count;
    the title adds the accuracy, trace / total."""
    counts = np.asarray(matrix, dtype=np.int64)
    frac = confusion_fractions(counts)
    classes, total = len(counts), int(counts.sum())
    fig, ax = plt.subplots(figsize=(6, 5.2))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(classes):
        for j in range(classes):
            if counts[i, j]:
                color = "white" if frac[i, j] > 0.5 else "black"
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(range(classes))
    ax.set_yticks(range(classes))
    ax.set_xlabel("predicted digit: argmax p(x | y) p(y)")
    ax.set_ylabel("true digit")
    accuracy = np.trace(counts) / total if total else math.nan
    ax.set_title(f"{title}\naccuracy {accuracy:.2%} of {total} images", fontsize=10)
    fig.colorbar(im, ax=ax, label="fraction of the true digit's images")
    return save_figure(fig, path)
