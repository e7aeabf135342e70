"""Evaluation: importance-weighted bpd per split, inference and sampling time, the results table; for a
class-conditional run also the conditional bpd, the accuracy of the flow as a Bayes classifier and its
confusion matrix."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .models import FlowModel, count_params
from .runs import checkpoint_path, load_model, run_title, training_summary, write_json
from .tables import Table


@torch.inference_mode()
def seeded_draws(
    model: FlowModel, images: Tensor, draw: Callable[[Tensor], Tensor], k: int = 1, batch_size: int = 256, seed: int = 0
) -> Tensor:
    """``draw(x)`` k times for every batch x of the uint8 ``images``: float64 (N, k, ...) on the CPU. The
    dequantization noise is seeded inside a forked RNG, so the values are reproducible (for the same
    images, order, batch_size and seed) and the caller's random stream is left untouched."""
    device = model.device
    fork = [device] if device.type == "cuda" else []
    out = []
    with torch.random.fork_rng(devices=fork):
        torch.manual_seed(seed)
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size].to(device)
            out.append(torch.stack([draw(x) for _ in range(k)], dim=1).double().cpu())
    return torch.cat(out) if out else torch.zeros(0, k, dtype=torch.float64)


def image_bpd(
    model: FlowModel, images: Tensor, k: int = 1, batch_size: int = 256, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Per image, float64 on the CPU: (importance-weighted bpd over k dequantization samples,
    single-sample bpd averaged over the same k draws) for the uint8 ``images``, seeded as ``seeded_draws``."""
    lp = seeded_draws(model, images, model.log_prob_single, k, batch_size, seed)
    scale = -1.0 / (model.dims * math.log(2))
    return (torch.logsumexp(lp, dim=1) - math.log(k)) * scale, lp.mean(dim=1) * scale


def dataset_bpd(
    model: FlowModel, images: Tensor, k: int = 1, batch_size: int = 256, seed: int = 0
) -> tuple[float, float]:
    """(importance-weighted bpd over k dequantization samples, single-sample bpd averaged over the
    same k draws), each the mean of ``image_bpd`` over the uint8 ``images``. NaNs propagate."""
    iw, single = image_bpd(model, images, k, batch_size, seed)
    return float(iw.mean()), float(single.mean())


def image_class_log_probs(model: FlowModel, images: Tensor, k: int = 1, batch_size: int = 256, seed: int = 0) -> Tensor:
    """A conditional model's one-sample estimates log p(x + u_j | y) - log q(u_j | x) for every image,
    noise draw j < k and class y: float64 (N, k, C) on the CPU. Each draw is one pass through the
    flows shared by all classes (``FlowModel.class_log_probs``), so every class sees the same noise.
    Seeded as ``image_bpd``, whose draws these are: its bpd of a conditional model is the marginal below."""
    lp = seeded_draws(model, images, model.class_log_probs, k, batch_size, seed)
    return lp if len(lp) else torch.zeros(0, k, model.prior.num_classes, dtype=torch.float64)


@torch.no_grad()
def own_samples(model: FlowModel, per_digit: int, temperature: float = 1.0, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A conditional model's samples, ``per_digit`` of each digit in order, and the digits asked for (both on
    the CPU): is a sample of digit d classified as d?"""
    digits = torch.arange(model.prior.num_classes).repeat_interleave(per_digit)
    g = torch.Generator(device=model.device).manual_seed(seed)
    return model.sample(len(digits), temperature, g, y=digits.to(model.device)).cpu(), digits


class ClassScores(NamedTuple):
    """Per image (float64 bpd; ``predicted``: int64 class)."""

    bpd: Tensor  # marginal, importance-weighted: -log2 p(x) / D
    bpd_single: Tensor  # marginal, one draw (averaged over the k draws)
    bpd_conditional: Tensor  # of the true label, importance-weighted: -log2 p(x | y) / D
    predicted: Tensor  # argmax_y log p(x | y) + log p(y)
    log_posterior: Tensor  # (N, C) log p(y | x) = log_softmax_y [log p(x | y) + log p(y)]


def class_scores(lp: Tensor, log_py: Tensor, labels: Tensor, dims: int) -> ClassScores:
    """From lp[n, j, y] = log p(x_n + u_j | y) - log q(u_j | x_n) (``image_class_log_probs``), k = lp.shape[1]:

    log p(x | y) ~ logsumexp_j lp[:, j, y] - log k                     (importance-weighted, per class)
    log p(x)     ~ logsumexp_{j,y} (lp[:, j, y] + log p(y)) - log k   = logsumexp_y [log p(x | y) + log p(y)]
    single       = mean_j logsumexp_y (lp[:, j, y] + log p(y))
    prediction   = argmax_y log p(x | y) + log p(y)                   (Bayes' rule: argmax p(y | x))
    log p(y | x) = log p(x | y) + log p(y) - log p(x)
    """
    k, scale = lp.shape[1], -1.0 / (dims * math.log(2))
    joint = lp + log_py.double().cpu()
    cond = torch.logsumexp(lp, dim=1) - math.log(k)  # (N, C)
    marginal = torch.logsumexp(joint.flatten(1), dim=1) - math.log(k)
    single = torch.logsumexp(joint, dim=2).mean(dim=1)
    true = cond.gather(1, labels.long().view(-1, 1)).squeeze(1)
    joint_iw = cond + log_py.double().cpu()
    posterior = torch.log_softmax(joint_iw, dim=1)
    return ClassScores(marginal * scale, single * scale, true * scale, joint_iw.argmax(dim=1), posterior)


def confusion_matrix(labels: Tensor, predicted: Tensor, classes: int = 10) -> Tensor:
    """(classes, classes) int64 counts: row = true label, column = predicted label."""
    index = labels.long().flatten() * classes + predicted.long().flatten()
    return torch.bincount(index, minlength=classes * classes).view(classes, classes)


def _conditional_split(model: FlowModel, images: Tensor, labels: Tensor, k: int, seed: int) -> dict[str, Any]:
    """One split of a conditional run: its bpd (marginal), single-sample bpd, conditional bpd, accuracy
    and confusion matrix."""
    s = class_scores(image_class_log_probs(model, images, k, seed=seed), model.prior.log_py, labels, model.dims)
    return {
        "bpd": round(float(s.bpd.mean()), 5),
        "bpd_single_sample": round(float(s.bpd_single.mean()), 5),
        "bpd_conditional": round(float(s.bpd_conditional.mean()), 5),
        "accuracy": round(float((s.predicted == labels).double().mean()), 5),
        "confusion": confusion_matrix(labels, s.predicted, model.prior.num_classes).tolist(),
    }


@torch.inference_mode()
def roundtrip_fraction(model: FlowModel, images: Tensor, batch_size: int = 256) -> float:
    """Fraction of images that decode(encode(x)) returns exactly (encoding at the bin centre)."""
    exact = 0
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(model.device)
        exact += int((model.decode(model.encode(x)) == x).flatten(1).all(dim=1).sum())
    return exact / len(images)


def _median_ms(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


@torch.inference_mode()
def timings(model: FlowModel, images: Tensor, reps: int = 5) -> dict[str, float]:
    """Median ms for log_prob on a batch of 64, and for sampling 64 images."""
    x = images[:64].to(model.device)
    return {
        "inference_ms_per_64": round(_median_ms(lambda: model.log_prob_single(x), reps), 2),
        "sampling_ms_per_64": round(_median_ms(lambda: model.sample(64), reps), 2),
    }


def evaluate_run(
    run: str | Path,
    splits: list[str] | None = None,
    k: int = 8,
    data_dir: str | None = None,
    max_images: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    timing_reps: int = 5,
    compile: bool = False,
    write: bool = True,
    every: int = 1,
) -> dict[str, Any]:
    """Evaluate a run's best checkpoint; writes results.json into the run directory (unless ``write``
    is false). ``compile``: run the coupling nets through torch.compile (faster on thousands of images;
    the timings' warm-up call absorbs the compilation).

    For a conditional run "bpd" and "bpd_single_sample" are the marginal -log2 p(x) / D, comparable
    with unconditional runs, and the results add, per split, "bpd_conditional" (-log2 p(x | y) / D of the
    true labels), "accuracy" (a fraction) and "confusion" (rows: true digit, columns: predicted), all from
    the same k noise draws per image, shared by the ten classes.

    ``every``: every n-th image of each split (a subset spread over the whole split: MNIST's test set is
    ordered, its first half the easier one), then at most ``max_images`` of those."""
    from .data import check_classes, load_data
    from .nets import compile_nets
    from .runtime import set_tf32

    if str(device).startswith("cuda"):
        set_tf32(False)  # true float32, where PyTorch's default lets convolutions run in TF32
    model, cfg = load_model(run, device)
    if compile:
        compile_nets(model)
    data = load_data(cfg, data_dir)
    if model.conditional:
        check_classes(data, model.prior.num_classes)
    splits = splits or data.splits
    bpd, single, counts, exact = {}, {}, {}, {}
    extra: dict[str, dict[str, Any]] = {"bpd_conditional": {}, "accuracy": {}, "confusion": {}}
    for split in splits:
        images, labels = (t[::every][:max_images] for t in data.split(split))
        if model.conditional:
            r = _conditional_split(model, images, labels, k, seed)
            bpd[split], single[split] = r.pop("bpd"), r.pop("bpd_single_sample")
            for key, v in r.items():
                extra[key][split] = v
        else:
            bpd[split], single[split] = (round(v, 5) for v in dataset_bpd(model, images, k, seed=seed))
        counts[split] = len(images)
        exact[split] = roundtrip_fraction(model, images)
    results = {
        "model": cfg.model,
        "dataset": cfg.dataset,
        **({"conditional": True, **extra} if model.conditional else {}),
        "params": count_params(model),
        "bpd": bpd,
        "bpd_single_sample": single,
        "importance_samples": k,
        "images": counts,
        "every": every,
        "roundtrip_exact": exact,  # fraction of images with decode(encode(x)) == x
        **timings(model, data.images["val"], timing_reps),
        "data_dir": str(data.root),
        "checkpoint": str(checkpoint_path(run)),
        "threads": torch.get_num_threads(),
        "device": device,
        "compiled": compile,
        "training": training_summary(run) if Path(run).is_dir() else None,
    }
    run = Path(run)
    if write and run.is_dir():
        write_json(run / "results.json", results)
    return results


def results_rows(results: list[dict[str, Any]]) -> Table:
    """The original report's table, with what each training took (epochs, wall-clock minutes)."""

    def fmt(r: dict[str, Any], split: str) -> str:
        v = r["bpd"].get(split)
        return "–" if v is None else f"{v:.3f}"

    def trained(r: dict[str, Any]) -> list[str]:
        t = r.get("training") or {}
        epochs = "–" if t.get("epochs") is None else f"{t['epochs']:g}"
        minutes = "–" if t.get("minutes") is None else f"{t['minutes']:.0f}"
        return [epochs, minutes]

    header = ["Model", "Train bpd", "Val bpd", "Test bpd", "Inference time (ms/64)", "Sampling time (ms/64)"]
    header += ["Parameters", "Epochs", "Training (min)"]
    rows = [
        [model_name(r), fmt(r, "train"), fmt(r, "val"), fmt(r, "test")]
        + [f"{r['inference_ms_per_64']:.0f}", f"{r['sampling_ms_per_64']:.0f}", f"{r['params']:,}", *trained(r)]
        for r in results
    ]
    return Table(header, rows, [False] + [True] * 8)


def results_table(results: list[dict[str, Any]]) -> str:
    """``results_rows`` as Markdown."""
    return results_rows(results).markdown()


def model_name(r: dict[str, Any]) -> str:
    """The model's name in a table: a shipped run's ``name``, else ``runs.run_title`` ("conditional" and a
    dataset other than MNIST noted)."""
    return r.get("name") or run_title(r["model"], bool(r.get("conditional")), r.get("dataset", "mnist"))


def classification_rows(results: list[dict[str, Any]]) -> Table | None:
    """The conditional runs among ``results``: accuracy of argmax_y p(x | y) p(y) and the conditional bpd
    -log2 p(x | y) / D per split (None when no run is conditional)."""
    rows = [r for r in results if r.get("conditional")]
    if not rows:
        return None
    splits = ("train", "val", "test")

    def cell(r: dict[str, Any], key: str, split: str, fmt: str) -> str:
        v = r.get(key, {}).get(split)
        return "–" if v is None else format(v, fmt)

    header = [
        "Model",
        *(f"{s.capitalize()} accuracy" for s in splits),
        *(f"{s.capitalize()} bpd given digit" for s in splits),
    ]
    cells = [
        [model_name(r), *(cell(r, "accuracy", s, ".2%") for s in splits)]
        + [cell(r, "bpd_conditional", s, ".3f") for s in splits]
        for r in rows
    ]
    return Table(header, cells, [False] + [True] * 2 * len(splits))


def classification_table(results: list[dict[str, Any]]) -> str:
    """``classification_rows`` as Markdown ("" when no run is conditional)."""
    table = classification_rows(results)
    return table.markdown() if table else ""
