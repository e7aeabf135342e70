"""Evaluation: importance-weighted bpd per split, inference and sampling time, the results table."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .models import FlowModel, count_params
from .runs import checkpoint_path, load_model, training_summary, write_json


@torch.inference_mode()
def image_bpd(
    model: FlowModel, images: Tensor, k: int = 1, batch_size: int = 256, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Per image, float64 on the CPU: (importance-weighted bpd over k dequantization samples,
    single-sample bpd averaged over the same k draws) for the uint8 ``images``. The noise is seeded
    inside a forked RNG, so the values are reproducible (for the same images, order, batch_size and
    seed) and the caller's random stream is left untouched."""
    device = model.device
    fork = [device] if device.type == "cuda" else []
    scale = -1.0 / (model.dims * math.log(2))
    iw_all, single_all = [], []
    with torch.random.fork_rng(devices=fork):
        torch.manual_seed(seed)
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size].to(device)
            lp = torch.stack([model.log_prob_single(x) for _ in range(k)], dim=-1).double()
            iw = torch.logsumexp(lp, dim=-1) - math.log(k)
            iw_all.append((iw * scale).cpu())
            single_all.append((lp.mean(dim=-1) * scale).cpu())
    empty = torch.zeros(0, dtype=torch.float64)
    return torch.cat(iw_all) if iw_all else empty, torch.cat(single_all) if single_all else empty


def dataset_bpd(
    model: FlowModel, images: Tensor, k: int = 1, batch_size: int = 256, seed: int = 0
) -> tuple[float, float]:
    """(importance-weighted bpd over k dequantization samples, single-sample bpd averaged over the
    same k draws), each the mean of ``image_bpd`` over the uint8 ``images``. NaNs propagate."""
    iw, single = image_bpd(model, images, k, batch_size, seed)
    return float(iw.mean()), float(single.mean())


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
) -> dict[str, Any]:
    """Evaluate a run's best checkpoint; writes results.json into the run directory (unless ``write``
    is false). ``compile``: run the coupling nets through torch.compile (faster on thousands of images;
    the timings' warm-up call absorbs the compilation)."""
    from .data import load_mnist
    from .nets import compile_nets

    model, cfg = load_model(run, device)
    if compile:
        compile_nets(model)
    data = load_mnist(data_dir if data_dir is not None else cfg.data_dir, cfg.split_seed, cfg.val_fraction, cfg.dataset)
    splits = splits or data.splits
    bpd, single, counts, exact = {}, {}, {}, {}
    for split in splits:
        images = data.split(split)[0][:max_images]
        bpd[split], single[split] = (round(v, 5) for v in dataset_bpd(model, images, k, seed=seed))
        counts[split] = len(images)
        exact[split] = roundtrip_fraction(model, images)
    results = {
        "model": cfg.model,
        "params": count_params(model),
        "bpd": bpd,
        "bpd_single_sample": single,
        "importance_samples": k,
        "images": counts,
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


def results_table(results: list[dict[str, Any]]) -> str:
    """The original report's Markdown table, with what each training took (epochs, wall-clock minutes)."""

    def fmt(r: dict[str, Any], split: str) -> str:
        v = r["bpd"].get(split)
        return "–" if v is None else f"{v:.3f}"

    def trained(r: dict[str, Any]) -> str:
        t = r.get("training") or {}
        epochs = "–" if t.get("epochs") is None else f"{t['epochs']:g}"
        minutes = "–" if t.get("minutes") is None else f"{t['minutes']:.0f}"
        return f"{epochs} | {minutes}"

    lines = [
        "| Model | Train bpd | Val bpd | Test bpd | Inference time (ms/64) | Sampling time (ms/64) | Parameters "
        "| Epochs | Training (min) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {fmt(r, 'train')} | {fmt(r, 'val')} | {fmt(r, 'test')} | "
            f"{r['inference_ms_per_64']:.0f} | {r['sampling_ms_per_64']:.0f} | {r['params']:,} | {trained(r)} |"
        )
    return "\n".join(lines)
