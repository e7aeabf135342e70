"""How far bfloat16 coupling nets move a trained model's log-likelihood (why evaluation stays float32).

    python benchmarks/bf16_error.py RUN_DIR [--images 256]

Loads the run's checkpoint, takes the first N validation images with fixed dequantization noise, and
compares log p(x) with float32 nets and with the nets under bfloat16 autocast (what `--precision
bfloat16` does in training steps): relative difference per image (mean, max) and the mean bpd of each.
"""

from __future__ import annotations

import argparse
import math

import torch

from flowmnist.data import load_dir
from flowmnist.nets import set_autocast
from flowmnist.runs import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--images", type=int, default=256)
    a = ap.parse_args()
    model, cfg = load_model(a.run_dir)
    x = load_dir(cfg.data_dir, cfg.split_seed, cfg.val_fraction).images["val"][: a.images].float()
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        f32 = model.log_prob_single(x, u).double()
        set_autocast(model, torch.bfloat16)
        b16 = model.log_prob_single(x, u).double()
    rel = (f32 - b16).abs() / f32.abs()
    to_bpd = -1 / (784 * math.log(2))
    print(
        f"{a.run_dir}: {len(x)} val images; |log p| relative difference bf16 vs float32: mean {rel.mean():.2e}, "
        f"max {rel.max():.2e}; bpd float32 {(f32 * to_bpd).mean():.5f}, bf16 {(b16 * to_bpd).mean():.5f}"
    )


if __name__ == "__main__":
    main()
