#!/usr/bin/env bash
# multi-vardeq on full MNIST with a GPU-sized batch for a fixed wall-clock budget, then its val bpd (K = 8,
# all 10,000 val images) and the training images/s, as one JSON line in OUT/gpu.json.
#
#   scripts/gpu.sh DATA_DIR [OUT]        # default OUT: runs/gpu-multi-vardeq
#   MINUTES=8 BATCH=256 LR=2e-3 DEVICE=cuda scripts/gpu.sh DATA_DIR   # the defaults
#
# DATA_DIR: the official training files (60,000 images: 50,000 train / 10,000 val, split seed 42), as for
# the shipped models (scripts/pretrained.sh). MINUTES counts compilation and validation, as on the CPU.
# DEVICE=cpu MINUTES=0.5 EVAL_IMAGES=64 checks the script on a machine without a GPU.
set -euo pipefail
data=${1:?usage: scripts/gpu.sh DATA_DIR [OUT]}
out=${2:-runs/gpu-multi-vardeq}
BIN=${BIN:-.venv/bin}
MINUTES=${MINUTES:-8} BATCH=${BATCH:-256} LR=${LR:-2e-3} DEVICE=${DEVICE:-cuda} EVAL_IMAGES=${EVAL_IMAGES:-10000}
# 16x the CPU batch: the warm-up counts steps, so it is shortened to cover about as many images as on the CPU.
"$BIN/flowmnist" train --model multi-vardeq --data-dir "$data" --minutes "$MINUTES" --batch-size "$BATCH" \
  --lr "$LR" --warmup-steps 10 --device "$DEVICE" --tf32 --out "$out" --force
"$BIN/flowmnist" evaluate "$out" --split val --max-images "$EVAL_IMAGES" --importance-samples 8 \
  --device "$DEVICE" --json > "$out/results.line"
"$BIN/python" - "$out" "$BATCH" "$DEVICE" <<'EOF'
import csv, json, sys
from pathlib import Path

out, batch, device = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rows = [r for r in csv.DictReader((out / "metrics.csv").open()) if r["split"] == "train"]
first, last = rows[0], rows[-1]  # from the first logged step: compilation is not training speed
steps = int(last["step"]) - int(first["step"])
seconds = float(last["seconds"]) - float(first["seconds"])
results = json.loads((out / "results.line").read_text())
if device.startswith("cuda"):
    import torch

    device = torch.cuda.get_device_name()
line = {"device": device, "batch_size": batch, "steps": int(last["step"]),
        "epochs": results["training"]["epochs"], "minutes": results["training"]["minutes"],
        "train_images_per_s": round(steps * batch / seconds, 1) if steps else None, "val_bpd": results["bpd"]["val"]}
(out / "gpu.json").write_text(json.dumps(line) + "\n")
print(json.dumps(line))
EOF
