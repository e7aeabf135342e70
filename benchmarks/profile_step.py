"""Where a training step's time goes: convolutions vs everything else, per path.

    python benchmarks/profile_step.py [--model multi-vardeq] [--batch-size 128] [--paths eager,fast]

Builds each path as `flowmnist bench` does (same weights), runs 3 warm-up steps (compilation), then
profiles 2 steps with torch.profiler and prints, per path: wall seconds per step, the self-CPU time of
oneDNN convolutions (forward and backward) per step, and the rest. On a CPU the convolutions' FLOPs
bound what any fusion of the rest can give.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import profile

from flowmnist.bench import _build, _images, _train_dtype, _train_step
from flowmnist.nets import set_autocast

CONV_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution_pointwise")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="multi-vardeq")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--paths", default="reference,eager,compiled,fast")
    a = ap.parse_args()
    x = _images(a.batch_size).float()
    for path in a.paths.split(","):
        torch.manual_seed(0)
        model = _build(a.model, path)
        set_autocast(model, _train_dtype(path))
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        for _ in range(3):
            _train_step(model, opt, x)
        t = time.perf_counter()
        with profile() as prof:
            for _ in range(2):
                _train_step(model, opt, x)
        wall = (time.perf_counter() - t) / 2
        conv = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in CONV_OPS) / 2e6
        print(
            f"{a.model} {path:9s} batch {a.batch_size}: {wall:.2f} s/step ({a.batch_size / wall:.1f} img/s); "
            f"convolutions {conv:.2f} s ({100 * conv / wall:.0f}%), the rest {wall - conv:.2f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
