#!/usr/bin/env bash
# The README's showcase: four short runs (one per model), evaluated, then every figure and the HTML
# report. Usage: scripts/showcase.sh DATA_DIR [MINUTES_PER_RUN] [OUT]   (defaults: 1.5 minutes, runs/showcase)
set -euo pipefail
data=${1:?usage: scripts/showcase.sh DATA_DIR [MINUTES_PER_RUN] [OUT]}
minutes=${2:-1.5}
out=${3:-runs/showcase}
fm=${FLOWMNIST:-.venv/bin/flowmnist}
runs=()
for m in simple vardeq multi-simple multi-vardeq; do
  $fm train --model "$m" --data-dir "$data" --minutes "$minutes" --out "$out/$m" --force --val-every 20
  $fm evaluate "$out/$m" --importance-samples 8 --max-images 500 >/dev/null
  runs+=("$out/$m")
done
$fm table "${runs[@]}"
$fm report "${runs[@]}" --out "$out/report"
