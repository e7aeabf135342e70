"""The conditional model's trade-off: classification accuracy against marginal bpd, one point per design
and weight, every setting trained for the same number of steps on the same data.

    python benchmarks/conditional.py --data-dir ../shared/data/mnist --steps 3000 [--out runs/conditional]
    python benchmarks/conditional.py --figure-only      # redraw and print the table from docs/results/

Each setting is `flowmnist train --model multi-vardeq --steps N` (seed 0, the default recipe; a setting
may set its own --steps) pinned to one core with one thread (--core), one after another; a step budget,
unlike --minutes, gives every setting the same training whatever else runs beside it. Then, on the first
--val-images validation images (K = 1, seed 0): the marginal bpd -log2 sum_y p(x | y) p(y) / D, the
accuracy of argmax_y p(y | x), and the accuracy of the model on its own samples (--samples per digit at
T = 1: is a sample of digit d classified as d?).
Results: docs/results/conditional.json; figure: docs/images/conditional.png. An interrupted sweep resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from flowmnist.runtime import cpu_kind

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results" / "conditional.json"
FIGURE = ROOT / "docs" / "images" / "conditional.png"

# name -> train options (besides --model multi-vardeq); "all"/"top": where the class means sit, lambda:
# the weight of log p(y | x) in nats per image, spread: the initial means' std (else all at 0), fixed: those
# means and unit scales kept (FlowGMM).
SETTINGS: dict[str, list[str]] = {
    "unconditional": [],
    "all lambda=0": ["--conditional"],
    "top lambda=0": ["--conditional", "--class-latent", "top"],
    "all lambda=100": ["--conditional", "--hybrid-weight", "100"],
    "top lambda=10": ["--conditional", "--class-latent", "top", "--hybrid-weight", "10"],
    "top lambda=100": ["--conditional", "--class-latent", "top", "--hybrid-weight", "100"],
    "top lambda=1000": ["--conditional", "--class-latent", "top", "--hybrid-weight", "1000"],
    "top spread=0.5 lambda=0": ["--conditional", "--class-latent", "top", "--class-spread", "0.5"],
    "top fixed spread=0.5": ["--conditional", "--class-latent", "top", "--class-spread", "0.5", "--class-fixed"],
    "top fixed spread=0.5 lambda=10": [
        *("--conditional", "--class-latent", "top", "--class-spread", "0.5", "--class-fixed", "--hybrid-weight", "10")
    ],
    "top fixed spread=0.5 lambda=1": [
        *("--conditional", "--class-latent", "top", "--class-spread", "0.5", "--class-fixed", "--hybrid-weight", "1")
    ],
    "top fixed spread=0.5 (9000 steps)": [
        *("--conditional", "--class-latent", "top", "--class-spread", "0.5", "--class-fixed", "--steps", "9000")
    ],
    "top fixed spread=0.25": ["--conditional", "--class-latent", "top", "--class-spread", "0.25", "--class-fixed"],
    "top fixed spread=1": ["--conditional", "--class-latent", "top", "--class-spread", "1", "--class-fixed"],
    "unconditional (9000 steps)": ["--steps", "9000"],
    "top spread=0.5 lambda=10": [
        "--conditional",
        "--class-latent",
        "top",
        "--class-spread",
        "0.5",
        "--hybrid-weight",
        "10",
    ],
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name).strip("_")


def train(name: str, a: argparse.Namespace) -> Path:
    """Train (or resume, or skip if done) one setting's run."""
    run = Path(a.out) / slug(name)
    if (run / "done").exists():
        return run
    if (run / "last.pt").exists():
        args = ["train", "--out", str(run), "--resume"]
    else:
        args = ["train", "--model", "multi-vardeq", "--data-dir", a.data_dir, "--steps", str(a.steps)]
        args += ["--epochs", "1000", "--val-images", str(a.val_images), "--out", str(run), *SETTINGS[name]]
    cmd = ["taskset", "-c", str(a.core), sys.executable, "-m", "flowmnist", *args]
    print("$", " ".join(cmd), flush=True)
    run.parent.mkdir(parents=True, exist_ok=True)
    with open(run.parent / f"{slug(name)}.log", "a") as log:
        code = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=log).returncode
    if code != 0:
        raise SystemExit(f"{name}: training failed (exit {code}); see {log.name}")
    (run / "done").touch()
    return run


def measure(run: Path, a: argparse.Namespace) -> dict:
    """Marginal bpd, accuracy on val, and accuracy on the model's own samples (conditional runs)."""
    import torch

    from flowmnist.config import Config
    from flowmnist.data import load_data
    from flowmnist.evaluate import class_scores, image_bpd, image_class_log_probs, own_samples
    from flowmnist.runs import load_model

    torch.set_num_threads(1)
    model, cfg = load_model(run)
    x, y = load_data(Config(data_dir=a.data_dir)).split("val")
    x, y = x[: a.val_images], y[: a.val_images]
    out = {"steps": cfg.steps, "val_images": len(x)}
    if not model.conditional:
        return out | {"bpd": round(float(image_bpd(model, x)[0].mean()), 5)}
    s = class_scores(image_class_log_probs(model, x), model.prior.log_py, y, model.dims)
    out |= {"bpd": round(float(s.bpd.mean()), 5), "accuracy": round(float((s.predicted == y).double().mean()), 5)}
    samples, digits = own_samples(model, a.samples)  # T = 1, seed 0
    judged = class_scores(image_class_log_probs(model, samples), model.prior.log_py, digits, model.dims).predicted
    return out | {"sample_accuracy": round(float((judged == digits).double().mean()), 5)}


def figure(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.6))
    ref = summary["settings"].get("unconditional", {}).get("bpd")
    names = []
    for name in SETTINGS:  # the table's order
        r = summary["settings"].get(name, {})
        if "accuracy" not in r:
            continue
        names.append(name)  # each point numbered; the numbers' key beside the plot
        color = "C2" if "fixed" in name else "C3" if "spread" in name else "C1" if name.startswith("top") else "C0"
        ax.plot(r["bpd"], 100 * r["accuracy"], "o", color=color)
        ax.annotate(
            str(len(names)), (r["bpd"], 100 * r["accuracy"]), fontsize=8, xytext=(4, 3), textcoords="offset points"
        )
    key = "\n".join(f"{i}  {n}" for i, n in enumerate(names, 1))
    ax.text(1.03, 1.0, key, transform=ax.transAxes, fontsize=8, va="top", family="monospace")
    if ref is not None:
        ax.axvline(ref, color="gray", ls="--", lw=1, label=f"unconditional ({ref:.3f})")
        ax.axvspan(ref, ref + 0.01, color="gray", alpha=0.12, label="within 0.01 bpd")
    ax.axhline(99, color="C2", ls=":", lw=1, label="99 % accuracy")
    ax.set_xlabel(f"marginal val bpd (first {summary['val_images']} val images, K = 1)")
    ax.set_ylabel("val accuracy (%)")
    ax.set_title(f"multi-vardeq, {summary['steps']} steps unless named; {summary['machine']}", fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def table(summary: dict) -> str:
    """The sweep as a Markdown table: marginal bpd, its excess over the unconditional run of as many steps,
    accuracies."""
    ref = {r["steps"]: r["bpd"] for n, r in summary["settings"].items() if n.startswith("unconditional")}
    lines = [
        "| setting | steps | marginal val bpd | vs unconditional | val accuracy | accuracy on its own samples |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in SETTINGS:
        r = summary["settings"].get(name)
        if r is None:
            continue
        twin = ref.get(r["steps"])  # the unconditional run of the same steps
        excess = f"{r['bpd'] - twin:+.4f}" if twin is not None and not name.startswith("unconditional") else "–"
        acc = f"{100 * r['accuracy']:.2f} %" if "accuracy" in r else "–"
        own = f"{100 * r['sample_accuracy']:.1f} %" if "sample_accuracy" in r else "–"
        lines.append(f"| {name} | {r['steps']:,} | {r['bpd']:.4f} | {excess} | {acc} | {own} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", help="the official MNIST IDX files (60,000 training images)")
    p.add_argument("--steps", type=int, default=3000, help="each setting's optimizer steps (default 3000)")
    p.add_argument("--val-images", type=int, default=10000, help="validation images measured (default 10000)")
    p.add_argument("--samples", type=int, default=100, help="samples per digit judged by the model (default 100)")
    p.add_argument("--out", default="runs/conditional", help="run directories (default runs/conditional)")
    p.add_argument("--only", help="comma-separated setting names (default all)")
    p.add_argument("--core", type=int, default=1, help="the core the runs are pinned to (default 1)")
    p.add_argument("--figure-only", action="store_true", help="redraw the figure from docs/results")
    a = p.parse_args()
    names = a.only.split(",") if a.only else list(SETTINGS)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        sys.exit(f"--only: unknown setting {unknown[0]!r}; choose from {', '.join(SETTINGS)}")
    if a.figure_only:
        figure(json.loads(RESULTS.read_text()), FIGURE)
        print(table(json.loads(RESULTS.read_text())))
        return
    if not a.data_dir:
        sys.exit("--data-dir is required to train")
    summary = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"settings": {}}
    summary |= {"machine": str(cpu_kind()), "steps": a.steps, "val_images": a.val_images}
    for name in names:
        if (Path(a.out) / slug(name) / "done").exists() and name in summary["settings"]:
            continue  # trained and measured
        summary["settings"][name] = measure(train(name, a), a)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(summary, indent=1) + "\n")
        print(name, summary["settings"][name], flush=True)
    figure(summary, FIGURE)
    print(table(summary))


if __name__ == "__main__":
    main()
