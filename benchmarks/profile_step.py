"""Where a training step's (or sampling's) time goes: convolutions vs everything else, per path.

    python benchmarks/profile_step.py [--model multi-vardeq] [--batch-size 128] [--paths eager,fast]
    python benchmarks/profile_step.py --sample [--batch-size 64]      # model.sample(64), float32

Builds each path as `flowmnist bench` does (same weights), runs 3 warm-up steps (compilation), then
profiles 2 steps with torch.profiler and prints, per path: wall seconds per step, the self-CPU time of
oneDNN convolutions (forward and backward) per step, and the rest. On a CPU the convolutions' FLOPs
bound what any fusion of the rest can give. With --sample it also prints the convolutions' float32 rate
(GFLOP/s, from their shapes; in the compiled path the GEMM output convolutions are not counted as
convolutions, so its rate is over the true convolutions only), the time of a 1-image call (what does
not scale with the batch: dispatch, guards, Python), and, for scale, the rate of one large float32
convolution (3x3, 256 -> 256 channels, 28x28, batch 32, channels-last): about the most this CPU's
oneDNN does, so the model's convolutions can be compared with a measured ceiling.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import profile

from flowmnist.bench import _build, _images, _interleaved, _train_dtype, _train_step
from flowmnist.nets import set_autocast
from flowmnist.runtime import tune_allocator
from flowmnist.train import make_optimizer

CONV_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution_pointwise")


def median_seconds(fn, reps: int) -> float:
    """Median seconds of ``reps`` calls of ``fn`` under inference mode, after a warm-up call."""
    with torch.inference_mode():
        times, _ = _interleaved({"fn": fn}, reps)
    return statistics.median(times["fn"])


def large_conv_rate(reps: int = 10) -> float:
    """GFLOP/s of a large float32 3x3 convolution (256 -> 256 channels, 28x28, batch 32, channels-last)."""
    x = torch.randn(32, 256, 28, 28).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3).contiguous(memory_format=torch.channels_last)
    flop = 2 * 32 * 28 * 28 * 256 * 256 * 9
    return flop / median_seconds(lambda: F.conv2d(x, w, padding=1), reps) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="multi-vardeq")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--paths", default="plain,eager,compiled,fast")
    ap.add_argument("--sample", action="store_true", help="profile sampling (inference mode) instead")
    a = ap.parse_args()
    if a.sample:
        tune_allocator()  # as `flowmnist sample` does (`flowmnist train` does not)
    x = _images(a.batch_size).float()
    with profile(record_shapes=True):  # the profiler's first session pays its set-up: not in a path's time
        torch.ones(1).add_(1)
    if a.sample:
        print(f"a large float32 convolution (3x3, 256 -> 256, 28x28, batch 32) runs at {large_conv_rate():.0f} GFLOP/s")
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
        rate = alone = ""
        if a.sample:  # forward only: FLOPs from each convolution's shapes (stride 1, "same" padding here)
            flop = 0
            for e in prof.key_averages(group_by_input_shape=True):
                if e.key == "aten::mkldnn_convolution":
                    (n, c, h, w), (o, _, kh, kw) = e.input_shapes[:2]
                    flop += e.count * 2 * n * o * h * w * c * kh * kw  # 2 per multiply-add
            rate = f" at {flop / 2e9 / conv:.0f} GFLOP/s ({flop / 2e9:.1f} GFLOP per step)"
            # (the warm-up call may compile for batch size 1)
            alone = f"; a 1-image call {1e3 * median_seconds(lambda model=model: model.sample(1), 6):.1f} ms"
        print(
            f"{a.model} {what} {path:9s} batch {a.batch_size}: {wall:.2f} s/step ({a.batch_size / wall:.1f} img/s); "
            f"convolutions {conv:.2f} s ({100 * conv / wall:.0f}%){rate}, the rest {wall - conv:.2f} s{alone}",
            flush=True,
        )


if __name__ == "__main__":
    main()
