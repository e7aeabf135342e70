#!/usr/bin/env bash
# The shipped models: how each was trained on full MNIST, evaluated and shipped, and how the README's
# figures of them are made. Every step is a plain flowmnist command; rerun any of them.
#
#   scripts/pretrained.sh train    DATA_DIR MODEL   # train (or --resume) runs/full/MODEL for its epochs
#   scripts/pretrained.sh evaluate MODEL            # K = 8 on the first 10,000 train and all 10,000 val images
#   scripts/pretrained.sh ship     MODEL            # into src/flowmnist/pretrained/MODEL, manifest rewritten
#   scripts/pretrained.sh figures                   # docs/images/ from every shipped model
#
# DATA_DIR: the official MNIST training files (60,000 images: 50,000 train / 10,000 val). CORE=N pins a
# training to CPU core N with one thread, so that two runs share a 2-core machine without slowing each
# other's steps (a 2-thread run stalls whenever anything else takes one of its cores).
set -euo pipefail
BIN=${BIN:-.venv/bin}
RUNS=${RUNS:-runs/full}

epochs() {  # fixed per model, from its measured step rate, to fit the CPU budget on 2 cores
  case $1 in
    multi-vardeq) echo 6 ;;
    multi-simple) echo 7 ;;
    *) echo "no epoch count fixed for $1" >&2; exit 2 ;;
  esac
}

pin() {
  if [ -n "${CORE:-}" ]; then OMP_NUM_THREADS=1 taskset -c "$CORE" "$@"; else "$@"; fi
}

case ${1:-} in
  train)
    data=$2 model=$3 run=$RUNS/$3
    if [ -f "$run/last.pt" ]; then
      pin "$BIN/flowmnist" train --out "$run" --resume
    else
      pin "$BIN/flowmnist" train --model "$model" --data-dir "$data" --epochs "$(epochs "$model")" --out "$run"
    fi ;;
  evaluate)
    "$BIN/flowmnist" evaluate "$RUNS/$2" --split train --split val --max-images 10000 \
      --importance-samples 8 --compile ;;
  ship)
    "$BIN/python" scripts/ship_pretrained.py "$RUNS/$2" ;;
  figures)
    out=docs/images
    "$BIN/flowmnist" samples --pretrained all --out "$out" --n 36
    "$BIN/flowmnist" samples --pretrained all --out "$out" --n 36 --temperature 0.7
    "$BIN/flowmnist" interpolate --pretrained all --out "$out" --pairs 2 --steps 10
    "$BIN/flowmnist" dequant --pretrained all --out "$out" --images 64
    "$BIN/flowmnist" curves --pretrained all --out "$out"
    "$BIN/flowmnist" concepts --out "$out" ;;
  *)
    sed -n '2,12p' "$0"; exit 2 ;;
esac
