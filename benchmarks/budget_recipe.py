"""The CPU-budget protocol: train multi-vardeq with several recipes for the same wall-clock
budget on this machine, one after another, and compare their validation bpd.

    python benchmarks/budget_recipe.py --data-dir ../shared/data/mnist-10k --minutes 10 \
        --recipes default,reference-recipe [--out runs/recipe]

Each recipe is `flowmnist train --minutes M` with the options below (a run directory per recipe under
--out). Printed per recipe: optimizer steps taken, the run's final validation bpd (single-sample, the
run's fixed per-image noise, float32; with an EMA these are the averaged weights), the same for the raw
weights of last.pt (what the EMA bought), and the best validation bpd. Every recipe validates after the
same number of training images (--val-images), whatever its batch size, so validations cost each
recipe the same share of the budget. Run it alone on the machine:
the budget is wall-clock time, so anything else running steals steps.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from flowmnist.config import Config
from flowmnist.data import load_dir
from flowmnist.dist import Dist
from flowmnist.runs import load_checkpoint, load_model
from flowmnist.train import sharded_bpd, val_noise

RECIPES = {
    # The package defaults: compiled nets, bfloat16 training steps where native, batch 16, LR 2e-3 with a
    # 50-step warm-up and cosine decay to 0 over the budget, no EMA.
    "default": [],
    # The same speed, the reference's recipe: batch 128, Adam 1e-3, x0.99 per epoch, no warm-up, no EMA.
    "reference-recipe": ["--batch-size", "128", "--schedule", "step", "--lr", "1e-3", "--warmup-steps", "0"],
    # The defaults at the reference's batch size, with and without an EMA of the weights.
    "batch128": ["--batch-size", "128"],
    "batch128-ema": ["--batch-size", "128", "--ema", "0.99"],
    # The defaults in float32 (what bfloat16 training steps buy, at equal wall-clock).
    "float32": ["--precision", "float32"],
    # The defaults at a higher peak LR.
    "lr3e-3": ["--lr", "3e-3"],
    # Other batch sizes than the default 16 (on 2 cores a smaller batch trades images/s for updates per
    # minute), and the default batch at other peak LRs.
    "batch8": ["--batch-size", "8"],
    "batch16": ["--batch-size", "16"],
    "batch16-lr1e-3": ["--batch-size", "16", "--lr", "1e-3"],
    "batch16-lr3e-3": ["--batch-size", "16", "--lr", "3e-3"],
    "batch32": ["--batch-size", "32"],
    "batch64": ["--batch-size", "64"],
}


def raw_val_bpd(run: Path) -> float:
    """Validation bpd of last.pt's raw weights (not the EMA), with the run's fixed validation noise."""
    model, cfg = load_model(run / "last.pt")
    model.load_state_dict(load_checkpoint(run / "last.pt")["model"])
    val = load_dir(cfg.data_dir, cfg.split_seed, cfg.val_fraction).images["val"]
    return sharded_bpd(model, val, val_noise(val, cfg.seed), Dist())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--recipes", default="default,reference-recipe", help=f"comma-separated of {', '.join(RECIPES)}")
    ap.add_argument("--out", default="runs/recipe")
    ap.add_argument("--val-images", type=int, default=9600, help="training images between validations (default 9600)")
    a = ap.parse_args()
    rows = []
    for name in a.recipes.split(","):
        run = Path(a.out) / name
        cmd = [sys.executable, "-m", "flowmnist", "train", "--model", "multi-vardeq", "--data-dir", a.data_dir]
        opts = RECIPES[name]
        batch = int(opts[opts.index("--batch-size") + 1]) if "--batch-size" in opts else Config().batch_size
        val_every = max(1, a.val_images // batch)
        cmd += ["--minutes", str(a.minutes), "--out", str(run), "--force", "--val-every", str(val_every), *opts]
        print("$", " ".join(cmd), file=sys.stderr, flush=True)
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        s = json.loads(out.strip().splitlines()[-1])
        cfg = json.loads((run / "config.json").read_text())
        raw = raw_val_bpd(run) if cfg["ema"] else s["val_bpd"]
        rows.append((name, s["step"], s["val_bpd"], raw, s["best_val_bpd"], cfg["precision"]))
        print(json.dumps({"recipe": name, **s, "raw_val_bpd": raw}), flush=True)
    print(f"\nmulti-vardeq, {a.minutes:g} min each on {torch.get_num_threads()} threads, data {a.data_dir}\n")
    print("| recipe | steps | val bpd (final) | val bpd, raw weights | best val bpd | train precision |")
    print("|---|---:|---:|---:|---:|---|")
    for name, steps, val, raw, best, prec in rows:
        print(f"| {name} | {steps} | {val:.4f} | {raw:.4f} | {best:.4f} | {prec} |")


if __name__ == "__main__":
    main()
