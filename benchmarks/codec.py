"""The flow codec (`flowmnist compress`) against the classical lossless codecs, on the same digits.

    python benchmarks/codec.py --data-dir DIR [--model multi-vardeq] [--n 10000]

On the first N official test digits (t10k-images in DIR; default all 10,000), and on the first 100 and 1:
the file's bits/dim beside the model's single-sample (K = 1) and importance-weighted (K = 8) bpd on the
same images, encode and decode images/s, and the classical codecs on the same images: gzip -9,
bzip2 -9, xz -9e and zstd -22 --ultra on the IDX file; PNG (optipng -o5), WebP lossless (cwebp -lossless
-z 9) and JPEG XL lossless at effort 9 (cjxl -d 0 -e 9), each on the digits tiled into one image and on
each digit alone (summed; --per-digit caps how many). A codec whose tool is missing is skipped with a
note. Writes docs/results/codec.json and docs/results/codec.md.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from flowmnist.codec import compress_images, decompress_bytes, idx_bytes
from flowmnist.config import MNIST_SHAPE
from flowmnist.data import read_idx
from flowmnist.runs import load_pretrained

ROOT = Path(__file__).resolve().parents[1]
STREAM = {  # codec: command reading the IDX file on stdin, writing the compressed file to stdout
    "gzip -9": ["gzip", "-9", "-c", "-n"],
    "bzip2 -9": ["bzip2", "-9", "-c"],
    "xz -9e": ["xz", "-9e", "-c"],
    "zstd -22 --ultra": ["zstd", "-22", "--ultra", "-c", "-q"],
}
IMAGE = {  # codec: (tool, command from an input PNG to an output file)
    "PNG (optipng -o5)": ("optipng", lambda i, o: ["optipng", "-o5", "-quiet", "-out", o, i]),
    "WebP lossless": ("cwebp", lambda i, o: ["cwebp", "-quiet", "-lossless", "-z", "9", i, "-o", o]),
    "JPEG XL lossless e9": ("cjxl", lambda i, o: ["cjxl", "--quiet", "-d", "0", "-e", "9", i, o]),
}


def bpd(nbytes: int, n: int) -> float:
    return round(8 * nbytes / (n * math.prod(MNIST_SHAPE)), 4)  # the benchmark's images are MNIST digits


def flow_codec(model, images: np.ndarray) -> dict:
    """The flow codec's file on ``images``: bits/dim, bound at its own noise, initial bits, speeds."""
    t = time.perf_counter()
    data, st = compress_images(model, images, name="pretrained")
    enc = time.perf_counter() - t
    t = time.perf_counter()
    original, _ = decompress_bytes(data, model)
    dec = time.perf_counter() - t
    assert original == idx_bytes(images), "round trip failed"
    return {
        "bytes": len(data),
        "bpd": bpd(len(data), len(images)),
        "bound_bpd_at_codec_noise": round(st.bound_bpd, 4),
        "initial_bits": st.initial_bits,
        "encode_images_per_s": round(len(images) / enc, 1),
        "decode_images_per_s": round(len(images) / dec, 1),
    }


def model_bpd(model, images: np.ndarray, k: int) -> float:
    x = torch.from_numpy(images.copy()).unsqueeze(1)
    with torch.no_grad():
        return round(float(torch.cat([model.bpd(x[i : i + 100], k) for i in range(0, len(x), 100)]).mean()), 4)


def stream_codecs(raw: bytes, n: int, notes: list[str]) -> dict:
    out = {}
    for name, cmd in STREAM.items():
        if shutil.which(cmd[0]) is None:
            notes.append(f"{name}: skipped, {cmd[0]} not installed")
            continue
        out[name] = bpd(len(subprocess.run(cmd, input=raw, capture_output=True, check=True).stdout), n)
    return out


def tile(images: np.ndarray) -> np.ndarray:
    """The digits in a near-square grid, row by row; empty cells black."""
    n = len(images)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    h, w = images.shape[1:]
    grid = np.zeros((rows * cols, h, w), np.uint8)
    grid[:n] = images
    return grid.reshape(rows, cols, h, w).transpose(0, 2, 1, 3).reshape(rows * h, cols * w)


def image_size(tool_cmd, pixels: np.ndarray, tmp: Path) -> int:
    from PIL import Image

    src, dst = tmp / "in.png", tmp / "out.bin"
    Image.fromarray(pixels).save(src)
    dst.unlink(missing_ok=True)
    subprocess.run(tool_cmd(str(src), str(dst)), check=True, capture_output=True)
    return dst.stat().st_size


def image_codecs(images: np.ndarray, per_digit: int, notes: list[str]) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name, (tool, cmd) in IMAGE.items():
            if shutil.which(tool) is None:
                notes.append(f"{name}: skipped, {tool} not installed (apt-get install webp libjxl-tools optipng)")
                continue
            out[f"{name}, tiled"] = bpd(image_size(cmd, tile(images), tmp), len(images))
            m = min(per_digit, len(images))
            total = sum(image_size(cmd, img, tmp) for img in images[:m])
            out[f"{name}, per digit"] = bpd(total, m)
    return out


def cpu_name() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    except OSError:
        return "unknown"
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Model name")), "unknown")


def markdown(r: dict) -> str:
    sizes = [str(s) for s in r["sizes"]]
    lines = [
        f"Flow codec ({r['model']}) and classical lossless codecs on the first N official MNIST test digits "
        f"(bits/dim; CPU: {r['cpu']}).",
        "",
        "| codec | " + " | ".join(f"N = {s}" for s in sizes) + " |",
        "|---|" + "---:|" * len(sizes),
    ]
    flow = r["results"]
    rows = [
        ("**flow codec (bits-back)**", [flow[s]["flow"]["bpd"] for s in sizes]),
        ("model bound, K = 1", [flow[s]["model_bpd_k1"] for s in sizes]),
        ("model bound, K = 8", [flow[s]["model_bpd_k8"] for s in sizes]),
    ]
    for name in flow[sizes[0]]["classical"]:
        rows.append((name, [flow[s]["classical"].get(name) for s in sizes]))
    lines += [f"| {name} | " + " | ".join("–" if v is None else f"{v:.3f}" for v in vals) + " |" for name, vals in rows]
    big = flow[sizes[0]]["flow"]
    lines += [
        "",
        f"Flow codec speed on N = {sizes[0]}: encode {big['encode_images_per_s']} images/s, decode "
        f"{big['decode_images_per_s']} images/s (one thread, the codec's fixed setting).",
    ]
    lines += [f"- {note}" for note in r["notes"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True, help="directory with t10k-images-idx3-ubyte[.gz]")
    p.add_argument("--model", default="multi-vardeq", help="shipped model (default multi-vardeq)")
    p.add_argument("--n", type=int, default=10000, help="test digits for the large set (default all 10,000)")
    p.add_argument("--per-digit", type=int, default=10**9, help="digits for the per-digit image codecs (default all)")
    p.add_argument("--out", default=str(ROOT / "docs/results/codec.json"), help="JSON file (a .md beside it)")
    a = p.parse_args()
    stem = "t10k-images-idx3-ubyte"
    path = next((Path(a.data_dir) / f for f in (stem, stem + ".gz") if (Path(a.data_dir) / f).is_file()), None)
    if path is None:
        sys.exit(f"{a.data_dir}: no {stem}[.gz]")
    all_images = read_idx(path)
    model = load_pretrained(a.model)
    sizes = sorted({min(a.n, len(all_images)), 100, 1}, reverse=True)
    r = {"model": a.model, "cpu": cpu_name(), "data": str(path), "sizes": sizes, "results": {}, "notes": []}
    for n in sizes:
        images = np.ascontiguousarray(all_images[:n])
        print(f"N = {n} ...", file=sys.stderr, flush=True)
        r["results"][str(n)] = {
            "flow": flow_codec(model, images),
            "model_bpd_k1": model_bpd(model, images, 1),
            "model_bpd_k8": model_bpd(model, images, 8),
            "classical": {
                **stream_codecs(idx_bytes(images), n, r["notes"]),
                **image_codecs(images, a.per_digit, r["notes"]),
            },
        }
    r["notes"] = sorted(set(r["notes"]))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(r))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
