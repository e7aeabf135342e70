"""`flowmnist bench`: the plain code path and the fast paths, side by side, on this machine.

Paths (one model each, sharing one set of weights):

* ``plain``: the plain implementation (``fast=False``: eager, float32, NCHW, written as the formulas read);
* ``eager``: the fast modules run eagerly (channels-last nets, fused layer norm, lean ConcatELU/gate);
* ``compiled``: those nets under torch.compile (nets.compile_nets), float32 throughout;
* ``default``: what ``flowmnist train`` does by default here: compiled, training steps at the default
  ``precision`` ("auto": bfloat16 nets where the device has native bf16) and a fused Adam step.
  Evaluation and sampling are float32 in every path (as ``flowmnist evaluate``), so ``default`` and
  ``compiled`` differ in training only.

"fast" keeps one meaning, ``Config.fast``: the fast modules of every path but ``plain``.

For each model it measures, in one process and interleaved (plain, eager, compiled, default,
plain, ...) so that a busy machine slows all alike and the ratios stay meaningful:

* training images/s: forward + backward + Adam step at ``batch_size`` (128 as in training),
* evaluation ms per batch of 64 (``log_prob_single`` under ``inference_mode``),
* sampling ms per 64 images,
* the first call's seconds (compilation, for the compiled paths; not in the medians),

and, in a fresh subprocess per (model, path), the peak resident memory (RSS high-water mark) of a
few training steps, so each figure is that configuration's own peak and not the process's history.

Inputs are random pixels (no data set needed): the cost of every layer does not depend on the values.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from .models import MODELS, FlowModel, build_model
from .nets import compile_nets, set_autocast
from .runtime import cpu_kind, native_bf16
from .train import make_optimizer

PATHS = ("plain", "eager", "compiled", "default")


def _train_dtype(path: str) -> torch.dtype | None:
    """The nets' dtype in training steps: bfloat16 for ``default`` where native (precision "auto")."""
    return torch.bfloat16 if path == "default" and native_bf16("cpu") else None


def _build(name: str, path: str) -> FlowModel:
    model = build_model(name, fast=path != "plain")
    if path in ("compiled", "default"):
        compile_nets(model)
    return model


def _models(name: str, seed: int = 0) -> dict[str, FlowModel]:
    """A model per path with identical (non-trivial) weights."""
    torch.manual_seed(seed)
    ref = build_model(name)
    with torch.no_grad():  # leave the identity initialisation: every coupling does real work
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    models = {"plain": ref}
    for path in PATHS[1:]:
        models[path] = _build(name, path)
        models[path].load_state_dict(ref.state_dict())
    return models


def _images(model: FlowModel, n: int, seed: int = 0) -> torch.Tensor:
    """n random uint8 images of the model's shape."""
    shape = (n, *model.image_shape)
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _train_step(model: FlowModel, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    loss = model.bpd(x).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _interleaved(fns: dict[str, Callable[[], Any]], rounds: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds per call of each fn, alternating between them ``rounds`` times, after one warm-up call
    each (returned apart: it includes compilation for a compiled path)."""
    first = {}
    for k, fn in fns.items():
        t = time.perf_counter()
        fn()
        first[k] = time.perf_counter() - t
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return times, first


def time_model(
    name: str, steps: int = 5, batch_size: int = 128, reps: int = 5, eval_batch: int = 64
) -> dict[str, dict[str, float]]:
    """Training images/s (median over ``steps`` interleaved steps), eval and sampling ms per 64 (median of
    ``reps``, timed on batches of ``eval_batch`` and scaled to 64), for each path of model ``name``."""
    models = _models(name)
    opts = {k: make_optimizer(m, 1e-4, fused=k == "default") for k, m in models.items()}
    x = _images(models["plain"], batch_size).float()
    for k, m in models.items():
        m.train()
        set_autocast(m, _train_dtype(k))
    train, train_first = _interleaved({k: (lambda k=k: _train_step(models[k], opts[k], x)) for k in PATHS}, steps)
    xe = _images(models["plain"], eval_batch, seed=1)
    for m in models.values():
        m.eval()
        set_autocast(m, None)
    with torch.inference_mode():
        ev, ev_first = _interleaved({k: (lambda k=k: models[k].log_prob_single(xe)) for k in PATHS}, reps)
        sa, _ = _interleaved({k: (lambda k=k: models[k].sample(eval_batch)) for k in PATHS}, reps)
    per64 = 1000 * 64 / eval_batch
    return {
        k: {
            "train_img_per_s": round(batch_size / statistics.median(train[k]), 2),
            "eval_ms_per_64": round(per64 * statistics.median(ev[k]), 1),
            "sample_ms_per_64": round(per64 * statistics.median(sa[k]), 1),
            "first_train_step_s": round(train_first[k], 1),
            "first_eval_s": round(ev_first[k], 1),
            "train_precision": "bfloat16" if _train_dtype(k) else "float32",
        }
        for k in PATHS
    }


def _peak_rss_mb() -> float:
    """This process's RSS high-water mark in MB.

    Linux: VmHWM from /proc/self/status, which belongs to this process image. (ru_maxrss is not
    enough in a child: Linux carries the parent's high-water mark across fork and exec.) Elsewhere,
    ru_maxrss (KiB; bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def peak_memory_child(name: str, path: str, batch_size: int, steps: int = 2) -> None:
    """Run in a fresh interpreter: a few training steps of one (model, path); prints the peak RSS.
    Two steps suffice: the first allocates Adam's moments, the second is a steady-state step. malloc
    stays untuned, as in `flowmnist train` (see runtime.tune_allocator)."""
    torch.manual_seed(0)
    model = _build(name, path)
    set_autocast(model, _train_dtype(path))
    opt = make_optimizer(model, 1e-4, fused=path == "default")
    x = _images(model, batch_size).float()
    for _ in range(steps):
        _train_step(model, opt, x)
    print(json.dumps({"peak_rss_mb": round(_peak_rss_mb(), 1)}))


def peak_memory(name: str, path: str, batch_size: int = 128) -> float:
    """Peak RSS (MB) of training ``name`` on ``path``, measured in a subprocess of its own."""
    src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # so the child imports this flowmnist
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    code = f"from flowmnist.bench import peak_memory_child; peak_memory_child({name!r}, {path!r}, {batch_size})"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def run_bench(
    models: list[str] | None = None,
    steps: int = 5,
    batch_size: int = 128,
    memory: bool = True,
    progress: Callable[[str], None] | None = None,
    reps: int = 5,
    eval_batch: int = 64,
) -> dict[str, Any]:
    """All figures for each model and path, plus their ratios to the plain path and the conditions."""
    results: dict[str, Any] = {}
    for name in models or MODELS:
        if progress:
            progress(f"timing {name}")
        r = time_model(name, steps, batch_size, reps, eval_batch)
        if memory:
            for path in PATHS:
                if progress:
                    progress(f"peak memory {name} {path}")
                r[path]["peak_train_rss_mb"] = peak_memory(name, path, batch_size)
        ref = r["plain"]
        r["speedup"] = {
            path: {
                "train": round(r[path]["train_img_per_s"] / ref["train_img_per_s"], 2),
                "eval": round(ref["eval_ms_per_64"] / r[path]["eval_ms_per_64"], 2),
                "sample": round(ref["sample_ms_per_64"] / r[path]["sample_ms_per_64"], 2),
            }
            for path in PATHS[1:]
        }
        results[name] = r
    cpu = cpu_kind()
    return {
        "results": results,
        "conditions": {
            "cpu": str(cpu),  # model name and features
            "cpu_bf16": cpu.bf16,  # AVX512-BF16 or AMX: the default path's bfloat16 steps run natively
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "batch_size": batch_size,
            "train_steps_per_path": steps,
            "eval_and_sample_batch": eval_batch,
            "eval_and_sample_reps": reps,
        },
    }


def bench_table(bench: dict[str, Any]) -> str:
    """Markdown: one row per (model, path) with its ratios to the plain path."""
    lines = [
        "| Model | Path | Train (img/s) | Eval (ms/64) | Sampling (ms/64) | Peak train RSS (MB) | "
        "Speed-up train / eval / sampling | First step (s) |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for name, r in bench["results"].items():
        for path in PATHS:
            f = r[path]
            mem = f.get("peak_train_rss_mb")
            s = r["speedup"].get(path)
            ratios = "1 (baseline)" if s is None else " / ".join(f"{s[k]:.2f}x" for k in ("train", "eval", "sample"))
            if path == "default":
                ratios = f"**{ratios}**"
            label = path if f["train_precision"] == "float32" else f"{path} (train {f['train_precision']})"
            lines.append(
                f"| {name} | {label} | {f['train_img_per_s']:.1f} | {f['eval_ms_per_64']:.0f} | "
                f"{f['sample_ms_per_64']:.0f} | {'–' if mem is None else f'{mem:,.0f}'} | {ratios} | "
                f"{f['first_train_step_s']:.1f} |"
            )
    c = bench["conditions"]
    lines.append("")
    lines.append(f"CPU: {c['cpu']}")
    lines.append("")
    lines.append(
        f"torch {c['torch']}, {c['threads']} threads on {c['cpus']} CPUs, train batch {c['batch_size']} "
        f"({c['train_steps_per_path']} interleaved steps per path, median), eval/sampling batch "
        f"{c['eval_and_sample_batch']} (median of {c['eval_and_sample_reps']}, float32 in every path); speed-ups are "
        "the plain path's time over the path's; first step: the first training step's seconds (compilation for "
        "the compiled paths; inductor's on-disk cache makes later runs' shorter), not in the medians."
    )
    return "\n".join(lines)
