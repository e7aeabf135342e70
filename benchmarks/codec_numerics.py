"""What the codec's integer nets cost: the integer model's single-sample bound against the float model's,
at the same dequantization noise, on the same digits.

    python benchmarks/codec_numerics.py --data-dir DIR [--model multi-vardeq ...] [--n 300] [--bits 12,12 ...]
                                        [--ramp 32] [--profile]

For each model and each (act_bits, weight_bits) setting, the codec compresses the first N official test
digits (t10k-images in DIR) and records the base noise it decoded from the stream for each pixel; the
float model's single-sample bound log p(x + u) - log q(u | x) (float32, as trained) is evaluated at that
same noise. Their difference per image, in bits/dim, is the cost of the integer nets (and of the codec's
scale and shift precision); printed with its standard error, with the file's rate, the float bound and
the CPU time per image (process time: a fair figure on a machine shared with other work). ``--ramp 1``
codes every chunk at the full batch of 32 (the steady state of a large file); ``--profile`` prints where
the time went (cProfile, the 15 functions with the most time of their own).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import math
import pstats
import time

import numpy as np
import torch

from flowmnist import codec
from flowmnist.codec import CodecParams, compress_images, decompress_bytes, idx_bytes
from flowmnist.codec import chunk as chunk_coder
from flowmnist.data import read_idx
from flowmnist.runs import load_pretrained


def base_noise(plan, k: np.ndarray) -> np.ndarray:
    """u0 in [0, 1) of the base-noise grid indices the codec drew (the centre of each cell)."""
    y = (k + 0.5) * plan.dy
    if not plan.variational:
        return y
    a = plan.noise_alpha
    return (codec.exact.sigmoid(y) - a / 2) / (1 - a)


def measure(model, images: np.ndarray, params: CodecParams, version: int, decode: bool = True) -> dict:
    drawn: list[np.ndarray] = []
    bounds: list[np.ndarray] = []
    plans: list = []
    pop, chunk = chunk_coder.base_pop, codec.encode_chunk

    def recording_pop(st, plan, shape, ideal):
        k = pop(st, plan, shape, ideal)
        drawn.append(k)
        plans.append(plan)
        return k

    def recording_chunk(st, plan, x):
        bounds.append(chunk(st, plan, x))
        return bounds[-1]

    chunk_coder.base_pop, codec.encode_chunk = recording_pop, recording_chunk
    try:
        t = time.process_time()
        data, stats = compress_images(model, images, params=params, version=version)
        enc = time.process_time() - t
    finally:
        chunk_coder.base_pop, codec.encode_chunk = pop, chunk
    t = time.process_time()
    if decode:
        assert decompress_bytes(data, model)[0] == idx_bytes(images), "round trip failed"
    dec = time.process_time() - t if decode else math.nan
    u0 = np.concatenate([base_noise(plans[0], k) for k in drawn])
    x = torch.from_numpy(images.copy()).unsqueeze(1)
    with torch.no_grad():
        lp = torch.cat(
            [
                model.log_prob_single(x[i : i + 50], noise=torch.from_numpy(u0[i : i + 50]).float())
                for i in range(0, len(x), 50)
            ]
        )
    float_bpd = (-lp.double().numpy()) / (model.dims * math.log(2))
    diff = np.concatenate(bounds) / (model.dims * math.log(2)) - float_bpd
    return {
        "rate": stats.rate_bpd,
        "int_bound": stats.bound_bpd,
        "float_bound": float(float_bpd.mean()),
        "cost": float(diff.mean()),
        "cost_se": float(diff.std() / math.sqrt(len(diff))),
        "encode_cpu_ms": 1000 * enc / len(images),
        "decode_cpu_ms": 1000 * dec / len(images),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--model", action="append", help="shipped model(s) (default multi-vardeq)")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--bits", action="append", help="ACT,WEIGHT[,RANGE] bit widths (default the codec's)")
    p.add_argument("--no-decode", action="store_true", help="skip decoding back (faster)")
    p.add_argument("--format", type=int, default=codec.FORMAT_VERSION, help="1: the float nets, for reference")
    p.add_argument("--ramp", type=int, default=CodecParams.ramp, help="the chunk schedule's ramp (1: full batches)")
    p.add_argument("--profile", action="store_true", help="print a cProfile summary of each measurement")
    a = p.parse_args()
    images = read_idx(f"{a.data_dir}/t10k-images-idx3-ubyte.gz")[: a.n]
    for name in a.model or ["multi-vardeq"]:
        model = load_pretrained(name)
        for bits in a.bits or [f"{CodecParams.act_bits},{CodecParams.weight_bits}"]:
            act, weight, rng = ([int(b) for b in bits.split(",")] + [CodecParams.range_bits])[:3]
            params = CodecParams(act_bits=act, weight_bits=weight, range_bits=rng, ramp=a.ramp)
            prof = cProfile.Profile() if a.profile else None
            with prof or contextlib.nullcontext():
                r = measure(model, images, params, a.format, not a.no_decode)
            if prof:
                pstats.Stats(prof).sort_stats("tottime").print_stats(15)
            print(
                f"{name} format {a.format} A{act} W{weight} R{rng} n={len(images)}: "
                f"codec's bound {r['int_bound']:.4f}, "
                f"float bound {r['float_bound']:.4f} at the same noise, cost {r['cost']:+.4f} "
                f"+- {r['cost_se']:.4f} bits/dim; "
                f"file {r['rate']:.4f}; CPU time per image: encode {r['encode_cpu_ms']:.0f} ms, decode "
                f"{r['decode_cpu_ms']:.0f} ms ({torch.get_num_threads()} threads)",
                flush=True,
            )


if __name__ == "__main__":
    main()
