#!/usr/bin/env bash
# The shipped models: how each was trained on full MNIST, evaluated and shipped, and how the README's
# figures of them are made. Every step is a plain flowmnist command; rerun any of them.
#
#   scripts/pretrained.sh train    DATA_DIR NAME   # train (or --resume) runs/full/NAME for its budget
#   scripts/pretrained.sh evaluate NAME            # K = 8 on its splits (below)
#   scripts/pretrained.sh ship     NAME            # into src/flowmnist/pretrained/NAME, manifest rewritten
#   scripts/pretrained.sh test     DATA_DIR NAME   # the shipped NAME on all 10,000 t10k images, K = 8, into its results
#   scripts/pretrained.sh tight    DATA_DIR NAME   # a tighter test bound: K = ${TIGHT_K:-64} on every ${TIGHT_EVERY:-5}th
#   scripts/pretrained.sh figures                  # docs/images/ from every shipped model
#   scripts/pretrained.sh ood MNIST_DIR FASHION_DIR # both OOD directions: docs/images/ood_*.png, docs/results/
#
# NAME: a model (simple, vardeq, multi-simple, multi-vardeq, multi-vardeq-glow-wide), MODEL-cond for its
# class-conditional variant, or fashion-MODEL for one trained on Fashion-MNIST (DATA_DIR then
# holds Fashion-MNIST); the long-run candidates (docs/cpu-minutes.md): multi-vardeq-glow-deep and
# multi-vardeq-glow-wide-long (multi-vardeq-glow-wide for the long budget), and its conditional twin
# multi-vardeq-glow-wide-cond (INIT=RUN_DIR: the weights it starts from).
# DATA_DIR: the official training files (60,000 images: 50,000 train / 10,000 val). CORE=N pins a
# training, evaluation or OOD run to CPU core N with one thread, so that two runs share a 2-core machine
# without slowing each other (a 2-thread run stalls whenever anything else takes one of its cores).
set -euo pipefail
BIN=${BIN:-.venv/bin}
RUNS=${RUNS:-runs/full}

budget() {  # the original four: epochs fixed from their one-core step rate (3,125 steps an epoch), to fit
  # ~150 core-minutes; multi-vardeq-glow-wide: a wall-clock budget, the cosine over it, validated every
  # 15 minutes on the first 2,000 val images for its curve
  case $1 in
    multi-vardeq | multi-vardeq-cond | fashion-multi-vardeq | vardeq) echo --epochs 6 ;;  # 3.3 (vardeq 2.3) steps/s
    multi-simple | simple) echo --epochs 7 ;;                                               # 4.5 (simple 2.8) steps/s
    multi-vardeq-glow-wide) echo --minutes 135 --epochs 1000 --val-minutes 15 --val-images 2000 ;;  # 2.8 steps/s
    # The long runs: a step budget, so the schedule does not depend on the clock. The wide one: 60,000 steps,
    # about 570 CPU-minutes on the development machine of 2026-12 (1.76 steps per CPU-second alone on a core,
    # AMD EPYC with AVX512-BF16); the deep candidate's 42,000 about as many at 1.26; val every ~13 of them.
    multi-vardeq-glow-wide-long) echo --steps 60000 --epochs 1000 --val-every 1350 --val-images 2000 ;;
    multi-vardeq-glow-deep) echo --steps 42000 --epochs 1000 --val-every 1000 --val-images 2000 ;;
    # The long run's conditional twin (FlowGMM's fixed means, spread 0.5 as its pilots chose): the long run's
    # weights (INIT: a copy of its best.pt taken when the twin starts), 30,000 steps on the other core.
    multi-vardeq-glow-wide-cond)
      echo --steps 30000 --epochs 1000 --val-every 1500 --val-images 2000 --init-from "${INIT:-$RUNS/multi-vardeq-glow-wide-long}" ;;
    *) echo "no budget fixed for $1" >&2; exit 2 ;;
  esac
}

pin() {
  if [ -n "${CORE:-}" ]; then OMP_NUM_THREADS=1 taskset -c "$CORE" "$@"; else "$@"; fi
}

case ${1:-} in
  train)
    data=$2 name=$3 run=$RUNS/$3
    model=${name#fashion-} flags=()
    [ "$model" != "$name" ] && flags+=(--dataset fashion-mnist)
    model=${model%-long}  # MODEL-long: the same architecture for a longer budget
    # MODEL-cond: a fixed Gaussian per digit on the final latent (docs/conditional.md chose it)
    [ "${model%-cond}" != "$model" ] && model=${model%-cond} &&
      flags+=(--conditional --class-latent top --class-spread 0.5 --class-fixed)
    if [ -f "$run/last.pt" ]; then
      pin "$BIN/flowmnist" train --out "$run" --resume
    else
      b=$(budget "$name")
      read -ra steps <<< "$b"
      pin "$BIN/flowmnist" train --model "$model" --data-dir "$data" "${steps[@]}" "${flags[@]}" --out "$run"
    fi ;;
  evaluate)  # MNIST: the first 10,000 train and all 10,000 val images (the wide models: ~23 core-minutes a
    # 10,000 at K = 8); the Fashion-MNIST one: the first 5,000 val and 5,000 test images (~7 core-minutes a
    # 5,000)
    case $2 in
      fashion-*) splits=(--split val --split test --max-images 5000) ;;
      *) splits=(--split train --split val --max-images 10000) ;;
    esac
    pin "$BIN/flowmnist" evaluate "$RUNS/$2" "${splits[@]}" --importance-samples 8 --compile ;;
  ship)
    "$BIN/python" scripts/ship_pretrained.py "$RUNS/$2" --name "$2" ;;
  test)  # once, for a finished model chosen on val
    mkdir -p "$RUNS"
    pin "$BIN/flowmnist" evaluate --pretrained "$3" --data-dir "$2" --split test --importance-samples 8 --compile \
      --json > "$RUNS/$3.test.json"
    "$BIN/python" scripts/ship_pretrained.py --test-results "$RUNS/$3.test.json" --name "$3" ;;
  tight)  # after test: more importance samples on a spread subset of t10k, beside (not replacing) K = 8
    mkdir -p "$RUNS"
    pin "$BIN/flowmnist" evaluate --pretrained "$3" --data-dir "$2" --split test --importance-samples "${TIGHT_K:-64}" \
      --every "${TIGHT_EVERY:-5}" --compile --json > "$RUNS/$3.tight.json"
    "$BIN/python" scripts/ship_pretrained.py --tight-results "$RUNS/$3.tight.json" --name "$3" ;;
  figures)  # the analysis of the unconditional MNIST models, then the conditional and Fashion-MNIST ones
    out=docs/images names=()
    for m in simple vardeq multi-simple multi-vardeq; do if [ -d "src/flowmnist/pretrained/$m" ]; then names+=("$m"); fi; done
    "$BIN/flowmnist" compare-samples --pretrained "${names[@]}" --out "$out" --n 36
    "$BIN/flowmnist" compare-samples --pretrained "${names[@]}" --out "$out" --n 36 --temperature 0.7
    "$BIN/flowmnist" interpolate --pretrained "${names[@]}" --out "$out" --pairs 2 --walk-images 10
    "$BIN/flowmnist" dequant --pretrained "${names[@]}" --out "$out" --images 64
    "$BIN/flowmnist" curves --pretrained "${names[@]}" --out "$out"
    "$BIN/flowmnist" concepts --out "$out"
    for m in multi-vardeq-cond multi-vardeq-glow-wide-cond; do  # the conditional ones: each digit, and test's confusion
      [ -d "src/flowmnist/pretrained/$m" ] || continue
      "$BIN/flowmnist" sample --pretrained "$m" --digit all --n 10 --out "$out/digits_$m.png"
      "$BIN/python" -c 'import json, sys; from flowmnist.figures import plot_confusion
plot_confusion(json.load(open(sys.argv[1]))["confusion"]["test"], sys.argv[2], sys.argv[3] + ", test")' \
        "src/flowmnist/pretrained/$m/results.json" "$out/confusion_${m}_test.png" "$m"
    done
    for m in multi-vardeq-glow-wide multi-vardeq-glow-wide-long; do
      [ -d "src/flowmnist/pretrained/$m" ] || continue
      "$BIN/flowmnist" sample --pretrained "$m" --n 64 --temperature 0.7 --out "$out/samples_$m.png"
    done
    "$BIN/flowmnist" compare-samples --pretrained fashion-multi-vardeq --out "$out/fashion" --n 36 --temperature 0.7
    ;;
  ood)  # the MNIST model: MNIST val vs Fashion-MNIST test; the Fashion-MNIST model: the other way round
    mnist=$2 fashion=$3 n=${OOD_IMAGES:-2000}
    mkdir -p docs/results
    r=$(pin "$BIN/flowmnist" ood --pretrained multi-vardeq --in-data "$mnist" --ood-data "$fashion" --split val \
      --ood-split test --max-images "$n" --out docs/images/ood_multi-vardeq.png --json)
    echo "$r" > docs/results/ood_multi-vardeq.json
    r=$(pin "$BIN/flowmnist" ood --pretrained fashion-multi-vardeq --in-data "$fashion" --ood-data "$mnist" --split test \
      --ood-split val --max-images "$n" --out docs/images/ood_fashion-multi-vardeq.png --json)
    echo "$r" > docs/results/ood_fashion-multi-vardeq.json ;;
  *)
    sed -n '2,16p' "$0"; exit 2 ;;
esac
