"""Where a training step's (or sampling's) time goes: convolutions vs everything else, per path.

    python benchmarks/profile_step.py [--model multi-vardeq] [--batch-size 128] [--paths eager,fast]
    python benchmarks/profile_step.py --sample [--batch-size 64]      # model.sample(64), float32

Builds each path as `flowmnist bench` does (same weights), runs 3 warm-up steps (compilation), then
profiles 2 steps with torch.profiler and prints, per path: wall seconds per step, the self-CPU time of
oneDNN convolutions (forward and backward) per step, and the rest. On a CPU the convolutions' FLOPs
bound what any fusion of the rest can give. With --sample it also prints the convolutions' float32 rate
(GFLOP/s, from their shapes; in the compiled path the GEMM output convolutions are not counted as
convolutions, so its rate is over the true convolutions only).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import profile

from flowmnist.bench import _build, _images, _train_dtype, _train_step
from flowmnist.nets import set_autocast, tune_allocator
from flowmnist.train import make_optimizer

CONV_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution_pointwise")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="multi-vardeq")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--paths", default="reference,eager,compiled,fast")
    ap.add_argument("--sample", action="store_true", help="profile sampling (inference mode) instead")
    a = ap.parse_args()
    if a.sample:
        tune_allocator()  # as `flowmnist sample` does (`flowmnist train` does not)
    x = _images(a.batch_size).float()
    for path in a.paths.split(","):
        torch.manual_seed(0)
        model = _build(a.model, path)
        if a.sample:
            model.eval()

            def work(model=model):
                with torch.inference_mode():
                    model.sample(a.batch_size)
        else:
            set_autocast(model, _train_dtype(path))
            opt = make_optimizer(model, 1e-4, fused=path == "fast")

            def work(model=model, opt=opt):
                _train_step(model, opt, x)

        for _ in range(3):
            work()
        t = time.perf_counter()
        with profile(record_shapes=True) as prof:
            for _ in range(2):
                work()
        wall = (time.perf_counter() - t) / 2
        events = prof.key_averages()
        conv = sum(e.self_cpu_time_total for e in events if e.key in CONV_OPS) / 2e6
        what = "sampling" if a.sample else "training"
        rate = ""
        if a.sample:  # forward only: FLOPs from each convolution's shapes (stride 1, "same" padding here)
            flop = 0
            for e in prof.key_averages(group_by_input_shape=True):
                if e.key == "aten::mkldnn_convolution":
                    (n, c, h, w), (o, _, kh, kw) = e.input_shapes[:2]
                    flop += e.count * 2 * n * o * h * w * c * kh * kw  # 2 per multiply-add
            rate = f" at {flop / 2e9 / conv:.0f} GFLOP/s ({flop / 2e9:.1f} GFLOP per step)"
        print(
            f"{a.model} {what} {path:9s} batch {a.batch_size}: {wall:.2f} s/step ({a.batch_size / wall:.1f} img/s); "
            f"convolutions {conv:.2f} s ({100 * conv / wall:.0f}%){rate}, the rest {wall - conv:.2f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
