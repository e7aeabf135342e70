#!/usr/bin/env bash
# What a machine other than the development one shows, in one run (e.g. a GPU machine with its own
# PyTorch build and CPU kind): the codec's committed golden file decoded there, the same 200 digits
# encoded there (the very bytes of the golden file, or not), and then scripts/gpu.sh's training check.
#
#   scripts/device_check.sh DATA_DIR OUT      # DATA_DIR: the official MNIST training files; results in OUT
#
# OUT/codec.json: machine, PyTorch, whether the golden file decoded to its SHA-256 and whether the file
# encoded there equals it byte for byte (OUT/codec-here.fmz, for decoding back on the development machine);
# OUT/gpu.json, metrics.csv, results.line: scripts/gpu.sh's line and log (MINUTES, BATCH, DEVICE as there).
set -euo pipefail
data=${1:?usage: scripts/device_check.sh DATA_DIR OUT}
out=${2:?usage: scripts/device_check.sh DATA_DIR OUT}
PY=${PY:-python3}
mkdir -p "$out"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
"$PY" - "$data" "$out" <<'EOF'
import hashlib, json, platform, sys, time
from pathlib import Path

import torch

from flowmnist.codec import compress_images, decompress_bytes
from flowmnist.data import FILES, read_idx
from flowmnist.runs import load_pretrained

data, out = Path(sys.argv[1]), Path(sys.argv[2])
golden = Path("tests/data/codec-golden.fmz").read_bytes()
model = load_pretrained("multi-vardeq")
t = time.perf_counter()
original, header = decompress_bytes(golden, model, name="codec-golden.fmz")
decode_s = time.perf_counter() - t
images = read_idx(data / (FILES["train-images"][0] + ".gz"))[: header.count]
t = time.perf_counter()
here, _ = compress_images(model, images, name=header.model_name, params=header.params, version=header.version)
encode_s = time.perf_counter() - t
(out / "codec-here.fmz").write_bytes(here)
cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
flags = set(open("/proc/cpuinfo").read().split())
line = {
    "cpu": cpu,
    "cpu_flags": sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2"))),
    "python": platform.python_version(),
    "torch": torch.__version__,
    "threads": torch.get_num_threads(),
    "golden_decoded_sha256": hashlib.sha256(original).hexdigest(),
    "golden_decodes": hashlib.sha256(original).hexdigest()
    == "58fe4ccaffc4eb302d28b92bf3f1c3d617991baa494805e898b0e0643c95606f",
    "encoded_here_equals_golden": here == golden,
    "decode_seconds": round(decode_s, 1),
    "encode_seconds": round(encode_s, 1),
}
(out / "codec.json").write_text(json.dumps(line) + "\n")
print(json.dumps(line))
EOF
# scripts/gpu.sh calls $BIN/flowmnist and $BIN/python: point them at this Python and these sources.
bin=$(mktemp -d)
printf '#!/bin/sh\nexec %s -m flowmnist "$@"\n' "$(command -v "$PY")" > "$bin/flowmnist"
printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v "$PY")" > "$bin/python"  # a venv's python needs its own path
chmod +x "$bin/flowmnist" "$bin/python"
run=$(mktemp -d)/gpu-multi-vardeq  # the run's checkpoints stay behind; its line and log come to OUT
BIN=$bin scripts/gpu.sh "$data" "$run"
cp "$run/gpu.json" "$run/metrics.csv" "$run/results.line" "$out/"
