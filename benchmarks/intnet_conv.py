"""Where the codec's integer nets spend their time: every convolution of one chunk, timed several ways.

    python benchmarks/intnet_conv.py --data-dir DIR [--model multi-vardeq] [--batch 32] [--repeat 5]

Runs the codec on one chunk of ``--batch`` official test digits, records each integer convolution with its
input, then times all of them (one thread) as

* ``float64 per tap``: the codec's ``IConv`` (channels first, one float64 product per tap);
* ``float64 taps side by side``: the layout it replaced (channels last, one product with the k^2 taps'
  weights side by side, their outputs summed at shifted positions);
* ``int8 pieces``: the same integers from ``torch._int_mm`` (int8 x int8 -> int32): activations as three
  base-256 digits, 12-bit weights as two 6-bit pieces (|piece| <= 32, so no kernel's 16-bit pair sums
  saturate), six int8 products recombined by shifts; checked equal to the codec's;
* ``their int8 products alone``: the same without forming digits, columns and sums (a bound on any
  int8 layout of these pieces);
* ``float32 conv2d``: the float nets' convolution (not exact; the speed the float codec had).

Prints the total per variant and its multiply-accumulates per second, and whether this process's int8
kernels are exact for weights of 6, 7 and 8 bits (``ONEDNN_MAX_CPU_ISA=AVX2`` shows a CPU without VNNI).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from flowmnist.codec import CodecParams, compress_images, intnet
from flowmnist.data import read_idx
from flowmnist.runs import load_pretrained


def record(model, images, batch: int) -> list[tuple[intnet.IConv, torch.Tensor]]:
    """Each convolution of the chunks of ``batch`` images with its input (2 batch images: chunks of 1, 1, 2,
    ..., batch / 2, then one of batch)."""
    seen: list[tuple[intnet.IConv, torch.Tensor]] = []
    call = intnet.IConv.__call__

    def recording(self, x):
        if x.shape[1] == batch:
            seen.append((self, x.clone()))
        return call(self, x)

    intnet.IConv.__call__ = recording
    try:
        compress_images(model, images, params=CodecParams(ramp=1, batch=batch))
    finally:
        intnet.IConv.__call__ = call
    return seen


def side_by_side(conv: intnet.IConv):
    co, ci, k, _ = conv.weight.shape
    taps = conv.weight.permute(1, 2, 3, 0).reshape(ci, -1).contiguous()

    def run(x):  # x channels first, as recorded
        x = x.permute(1, 2, 3, 0).contiguous()
        b, h, w, _ = x.shape
        p = conv.pad
        y = (F.pad(x, (0, 0, p, p, p, p)).reshape(-1, ci) @ taps).view(b, h + 2 * p, w + 2 * p, k * k, co)
        acc = y[:, :h, :w, 0].clone()
        for tap in range(1, k * k):
            dy, dx = divmod(tap, k)
            acc += y[:, dy : dy + h, dx : dx + w, tap]
        acc += conv.bias
        return torch.floor(acc * 2.0**-conv.f).clamp(-conv.spec.amax, conv.spec.amax).permute(3, 0, 1, 2)

    return run


def int8_pieces(conv: intnet.IConv, products_only: bool = False):
    co, ci, k, _ = conv.weight.shape
    w = conv.weight.long().permute(0, 2, 3, 1).reshape(co, -1)  # (co, k k ci), tap-major
    w0 = ((w + 32) & 63) - 32
    # oneDNN adds 128 to its first operand's bytes, so the activations' digits come first and the small
    # weight pieces second: their 16-bit pair sums 2 * 255 * 32 cannot saturate
    pieces = torch.cat([w0, (w - w0) >> 6]).t().to(torch.int8).contiguous()  # (k k ci, 2 co)
    cache: dict = {}

    def run(x):
        if products_only and "cols" in cache:  # the six int8 products alone, their inputs ready
            return torch._int_mm(cache["cols"], pieces)
        _, b, h, wd = x.shape
        p = conv.pad
        hp, wp = h + p, wd + p  # the codec's layout: padding shared between neighbours
        n, lead = b * hp * wp, p * wp + p
        digits = torch.zeros(3, ci, lead + n + lead, dtype=torch.int8)
        r = x.long()
        for i in range(3):
            d = ((r + 128) & 255) - 128 if i < 2 else r
            digits[i, :, lead : lead + n].view(ci, b, hp, wp)[:, :, :h, :wd] = d
            r = (r - d) >> 8
        offs = [dy * wp + dx for dy in range(k) for dx in range(k)]
        cols = torch.cat([digits[:, :, o : o + n] for o in offs], 1)  # (3, k k ci, n)
        cache["cols"] = cols = cols.permute(0, 2, 1).reshape(3 * n, k * k * ci)
        out = torch._int_mm(cols, pieces).view(3, n, 2, co)
        c = ((out[:, :, 1] << 6) + out[:, :, 0]).long()  # (3, n, co)
        acc = (c[2] << 16) + (c[1] << 8) + c[0] + conv.bias.long()
        acc = (acc >> conv.f).clamp_(-conv.spec.amax, conv.spec.amax)
        return acc.t().reshape(co, b, hp, wp)[:, :, :h, :wd].double()

    return run


def float32_conv(conv: intnet.IConv):
    w = (conv.weight * 2.0**-conv.f).float()
    b = (conv.bias * 2.0 ** -(conv.f + conv.spec.act_bits)).float()

    def run(x):
        return F.conv2d(x.transpose(0, 1).float() * 2.0**-conv.spec.act_bits, w, b, padding=conv.pad)

    return run


def int8_exact(weight_bound: int) -> bool:
    """Whether this process's int8 kernels multiply full-range int8 activations by weights in
    [-weight_bound, weight_bound - 1] exactly (kernels without VNNI add pairs of products in 16 bits)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (256, 576), dtype=torch.int8, generator=g)
    w = torch.randint(-weight_bound, weight_bound, (576, 64), dtype=torch.int8, generator=g)
    a[:64], w[:, :8] = 127, weight_bound - 1  # the extremes, where pair sums are largest
    return torch.equal(torch._int_mm(a, w).long(), a.long() @ w.long())


def timed(fn, inputs, repeat: int) -> float:
    for x in inputs:
        fn(x)
    t = time.perf_counter()
    for _ in range(repeat):
        for x in inputs:
            fn(x)
    return (time.perf_counter() - t) / repeat


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--model", default="multi-vardeq")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(1)
    model = load_pretrained(a.model)
    images = read_idx(f"{a.data_dir}/t10k-images-idx3-ubyte.gz")[: 2 * a.batch]
    convs = record(model, images, a.batch)
    macs = sum(c.weight[0].numel() * x[0].numel() * len(c.bias) for c, x in convs)
    for c, x in convs:
        assert torch.equal(int8_pieces(c)(x), c(x)), "int8 pieces differ from the codec's integers"
    print(f"{a.model}: {len(convs)} integer convolutions of one chunk of {a.batch} digits, {macs / 1e9:.2f} GMAC")
    variants = {
        "float64 per tap (codec)": lambda c: c,
        "float64 taps side by side": side_by_side,
        "int8 pieces (6 products)": int8_pieces,
        "  their int8 products alone": lambda c: int8_pieces(c, products_only=True),
        "float32 conv2d (not exact)": float32_conv,
    }
    exact = {b: int8_exact(b) for b in (32, 64, 128)}
    print("  int8 products exact here with weights in [-b, b):", ", ".join(f"b={b} {v}" for b, v in exact.items()))
    for name, make in variants.items():
        fns = [(make(c), x) for c, x in convs]
        t = sum(timed(fn, [x], a.repeat) for fn, x in fns)
        print(f"  {name:28s} {1000 * t:8.1f} ms  {macs / t / 1e9:6.1f} GMAC/s  {1000 * t / a.batch:6.2f} ms/digit")


if __name__ == "__main__":
    main()
