"""The flow codec (`flowmnist compress`) against the classical lossless codecs, on the same digits.

    python benchmarks/codec.py --data-dir DIR [--models multi-vardeq | all | A,B] [--n 10000] [--every 1]
                               [--workers W] [--streams S] [--sizes 100,1] [--cost-every C] [--no-classical]
                               [--merge]

The digits: every E-th of the first N official test digits (t10k-images in DIR; default all 10,000).
For each model (``all``: every shipped MNIST model): the file's bits/dim, the float model's single-sample
(K = 1) bpd on the same digits, the integer cost (the codec's own single-sample bound minus the float
model's at the same noise, as ``codec_numerics.py`` measures it, with its standard error, on every C-th
of the digits; ``--no-cost`` skips it), and encode and decode images/s (wall clock) and CPU ms per image
(all processes) with W worker processes (default 1) on a file of S streams (default: the codec's, by
image count), the CPU kind stated. For the first model also K = 8 and the first 100 and 1 digits
(``--sizes``). Then the classical codecs on the same digits: gzip -9, bzip2 -9, xz -9e and zstd -22
--ultra on the IDX file; PNG (optipng -o5), WebP lossless (cwebp -lossless -z 9), JPEG XL lossless at
effort 9 (cjxl -d 0 -e 9) and at its strongest (cjxl -d 0 -e 9 -E 3 -I 100 -g 3), each on the digits
tiled into one image and on each digit alone (summed; --per-digit caps how many). A codec whose tool is
missing is skipped with a note. Writes docs/results/codec.json and docs/results/codec.md (``--out``).
``--merge`` adds this run's models to the ``--out`` file's, measured on the same digits with as many
workers and the same format on the same CPU kind, keeping the file's other models, and its classical
codecs and sizes where this run measures none (``--no-classical``, ``--sizes ""``): a table of many
models measured a few at a time.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from flowmnist.codec import (
    FORMAT_VERSION,
    CodecParams,
    compress_images,
    decompress_bytes,
    idx_bytes,
    read_header,
    usable_cores,
)
from flowmnist.config import MNIST_SHAPE
from flowmnist.data import read_idx
from flowmnist.runs import PRETRAINED_ROOT, load_pretrained, pretrained_names

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
    "JPEG XL lossless e9 -E 3 -I 100 -g 3": (
        "cjxl",
        lambda i, o: ["cjxl", "--quiet", "-d", "0", "-e", "9", "-E", "3", "-I", "100", "-g", "3", i, o],
    ),
}


def bpd(nbytes: int, n: int) -> float:
    return round(8 * nbytes / (n * math.prod(MNIST_SHAPE)), 4)  # the benchmark's images are MNIST digits


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the codec's worker processes)."""
    return sum(
        u.ru_utime + u.ru_stime
        for u in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


def flow_codec(model, images: np.ndarray, workers: int = 1, streams: int | None = None) -> dict:
    """The flow codec's file on ``images``: bits/dim, bound at its own noise, initial bits, speeds."""
    t, c = time.perf_counter(), cpu_seconds()
    data, st = compress_images(model, images, name="pretrained", workers=workers, streams=streams)
    enc, enc_cpu = time.perf_counter() - t, cpu_seconds() - c
    t, c = time.perf_counter(), cpu_seconds()
    original, _ = decompress_bytes(data, model, workers=workers)
    dec, dec_cpu = time.perf_counter() - t, cpu_seconds() - c
    assert original == idx_bytes(images), "round trip failed"
    n = len(images)
    return {
        "bytes": len(data),
        "bpd": bpd(len(data), n),
        "bound_bpd_at_codec_noise": round(st.bound_bpd, 4),
        "initial_bits": st.initial_bits,
        "streams": len(read_header(data).parts()),
        "workers": workers,
        "encode_images_per_s": round(n / enc, 1),
        "decode_images_per_s": round(n / dec, 1),
        "encode_cpu_ms_per_image": round(1000 * enc_cpu / n, 1),
        "decode_cpu_ms_per_image": round(1000 * dec_cpu / n, 1),
    }


def integer_cost(model, images: np.ndarray) -> dict:
    """The integer model's single-sample bound minus the float model's at the same noise (bits/dim)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from codec_numerics import measure

    r = measure(model, images, CodecParams(), FORMAT_VERSION, decode=False)
    return {
        "integer_cost_bpd": round(r["cost"], 4),
        "integer_cost_se": round(r["cost_se"], 4),
        "integer_cost_digits": len(images),
    }


def mnist_models() -> list[str]:
    """The shipped models of MNIST digits (not Fashion-MNIST)."""
    return [
        m
        for m in pretrained_names()
        if json.loads((PRETRAINED_ROOT / m / "config.json").read_text()).get("dataset", "mnist") == "mnist"
    ]


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
            if m < len(images):
                notes.append(f"per digit: the first {m:,} of the {len(images):,} digits (--per-digit)")
    return out


def cpu_name() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    except OSError:
        return "unknown"
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Model name")), "unknown")


def cpu_flags() -> list[str]:
    """The vector extensions the codec's kernels may use, of those this CPU has (Linux /proc/cpuinfo)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]


def markdown(r: dict) -> str:
    d = r["digits"]
    lines = [
        f"Flow codec (format {r['format']}) and classical lossless codecs on {d['count']} official MNIST test digits "
        f"(every {d['every']}-th of the first {d['first']}; bits/dim; CPU: {r['cpu']} ({' '.join(r['cpu_flags'])}; "
        f"{r['usable_cores']} usable cores), {r['workers']} worker "
        f"process(es), torch {r['torch']}).",
        "",
        "| model | file | float bound K = 1 | integer cost | streams | encode img/s | decode img/s "
        "| CPU ms/img enc / dec |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in r["models"].items():
        cost = f"{m['integer_cost_bpd']:+.4f} ± {m['integer_cost_se']:.4f}" if "integer_cost_bpd" in m else "–"
        if m.get("integer_cost_digits", d["count"]) != d["count"]:
            cost += f" ({m['integer_cost_digits']:,} digits)"
        f = m["flow"]
        lines.append(
            f"| {name} | {f['bpd']:.4f} | {m['model_bpd_k1']:.4f} | {cost} | {f['streams']} | "
            f"{f['encode_images_per_s']} | {f['decode_images_per_s']} | "
            f"{f['encode_cpu_ms_per_image']} / {f['decode_cpu_ms_per_image']} |"
        )
    lines += ["", "| classical codec | bits/dim |", "|---|---:|"]
    lines += [f"| {name} | {v:.4f} |" for name, v in r["classical"].items()]
    if r["sizes"]:
        first = next(iter(r["models"]))
        lines += [
            "",
            f"{first} on the first N test digits:",
            "",
            "| | " + " | ".join(f"N = {s}" for s in r["sizes"]) + " |",
        ]
        lines.append("|---|" + "---:|" * len(r["sizes"]))
        res = [r["results"][str(s)] for s in r["sizes"]]
        rows = [
            ("**flow codec (bits-back)**", [x["flow"]["bpd"] for x in res]),
            ("model bound, K = 1", [x["model_bpd_k1"] for x in res]),
            ("model bound, K = 8", [x["model_bpd_k8"] for x in res]),
        ]
        rows += [(name, [x["classical"].get(name) for x in res]) for name in res[0]["classical"]]
        lines += [f"| {n} | " + " | ".join("–" if v is None else f"{v:.3f}" for v in vals) + " |" for n, vals in rows]
    lines += [""] + [f"- {note}" for note in r["notes"]]
    return "\n".join(lines) + "\n"


def merged(old: dict, new: dict, path: Path) -> dict:
    """``new``'s models added to ``old``'s (``new``'s replace those of the same name); ``old``'s classical
    codecs and sizes kept where ``new`` measured none. Refused where the two were measured differently."""
    keys = ("digits", "workers", "format", "cpu", "cpu_flags", "torch")
    differ = [k for k in keys if old.get(k) != new[k]]
    if differ:
        sys.exit(f"{path}: measured with other {', '.join(differ)}; --merge adds only to a like measurement")
    out = {**new, "models": {**old["models"], **new["models"]}, "notes": old["notes"] + new["notes"]}
    if not new["classical"]:
        out["classical"] = old["classical"]
    if not new["sizes"]:
        out["sizes"], out["results"] = old["sizes"], old["results"]
    return out


def classical(images: np.ndarray, per_digit: int, notes: list[str]) -> dict:
    return {**stream_codecs(idx_bytes(images), len(images), notes), **image_codecs(images, per_digit, notes)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True, help="directory with t10k-images-idx3-ubyte[.gz]")
    p.add_argument("--models", default="multi-vardeq", help="shipped models, comma-separated, or all (MNIST ones)")
    p.add_argument("--model", dest="models", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=10000, help="the first N test digits (default all 10,000)")
    p.add_argument("--every", type=int, default=1, help="every E-th of them (default 1: all)")
    p.add_argument("--workers", type=int, default=1, help="worker processes coding the streams (default 1)")
    p.add_argument("--streams", type=int, help="streams per file (default the codec's, by image count)")
    p.add_argument("--sizes", default="100,1", help="also the first model on the first N digits (default 100,1)")
    p.add_argument("--no-cost", action="store_true", help="skip the integer cost (one more encode per model)")
    p.add_argument("--cost-every", type=int, default=1, help="the integer cost on every C-th of the digits (default 1)")
    p.add_argument("--no-classical", action="store_true", help="skip the classical codecs")
    p.add_argument("--merge", action="store_true", help="add these models to the --out file's (same digits, workers)")
    p.add_argument("--per-digit", type=int, default=10**9, help="digits for the per-digit image codecs (default all)")
    p.add_argument("--out", default=str(ROOT / "docs/results/codec.json"), help="JSON file (a .md beside it)")
    a = p.parse_args()
    stem = "t10k-images-idx3-ubyte"
    path = next((Path(a.data_dir) / f for f in (stem, stem + ".gz") if (Path(a.data_dir) / f).is_file()), None)
    if path is None:
        sys.exit(f"{a.data_dir}: no {stem}[.gz]")
    if min(a.every, a.n, a.workers, a.cost_every) < 1:
        sys.exit("--n, --every, --workers and --cost-every must be 1 or more")
    all_images = read_idx(path)
    images = np.ascontiguousarray(all_images[: a.n : a.every])
    names = mnist_models() if a.models == "all" else [m.strip() for m in a.models.split(",") if m.strip()]
    sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
    r = {
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "usable_cores": usable_cores(),
        "torch": torch.__version__,
        "format": FORMAT_VERSION,
        "data": str(path),
        "digits": {"first": min(a.n, len(all_images)), "every": a.every, "count": len(images)},
        "workers": a.workers,
        "models": {},
        "classical": {},
        "sizes": sizes,
        "results": {},
        "notes": [],
    }
    for name in names:
        print(f"{name} on {len(images)} digits ...", file=sys.stderr, flush=True)
        model = load_pretrained(name)
        m = {"flow": flow_codec(model, images, a.workers, a.streams), "model_bpd_k1": model_bpd(model, images, 1)}
        if not a.no_cost:
            m.update(integer_cost(model, np.ascontiguousarray(images[:: a.cost_every])))
        r["models"][name] = m
    if not a.no_classical:
        r["classical"] = classical(images, a.per_digit, r["notes"])
    model = load_pretrained(names[0])
    for n in sizes:
        first = np.ascontiguousarray(all_images[:n])
        print(f"{names[0]} on the first {n} ...", file=sys.stderr, flush=True)
        r["results"][str(n)] = {
            "flow": flow_codec(model, first, a.workers, a.streams if a.streams and a.streams <= n else None),
            "model_bpd_k1": model_bpd(model, first, 1),
            "model_bpd_k8": model_bpd(model, first, 8),
            "classical": classical(first, a.per_digit, r["notes"]),
        }
    out = Path(a.out)
    if a.merge and out.is_file():
        r = merged(json.loads(out.read_text()), r, out)
    r["notes"] = sorted(set(r["notes"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(r))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
