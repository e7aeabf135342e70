"""What `runtime.tune_allocator` (glibc mallopt) buys and costs, each setting in a fresh process.

    python benchmarks/malloc_effect.py [--model multi-vardeq] [--reps 5]

For glibc's default malloc ("system", FLOWMNIST_MALLOC=system) and the tuned one, each figure in a new
interpreter (the allocator's state, which earlier work in a process changes, is what is measured):
evaluation (`log_prob_single`, batch 64) and sampling (64 images) on the plain and compiled paths,
the first call's ms and the median of --reps calls after it; then the peak RSS of two training steps
at batch 128 on the default (fast) path. glibc starts a process with its mmap threshold at 128 KiB and
raises it as large blocks are freed, so an untuned process's first batches fault in fresh pages for
every activation, and later ones whenever the heap's free top was handed back.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = """
import json, statistics, sys, time
import torch
from flowmnist.runtime import tune_allocator
tuned = tune_allocator()
from flowmnist.bench import _images, _models
name, path, what, reps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model = _models(name)[path].eval()
x = _images(64, seed=1)
run = (lambda n: model.log_prob_single(x[:n])) if what == "eval" else model.sample
ts = []
with torch.inference_mode():
    if path == "compiled":  # compile with another batch size first (dynamic shapes): not the timed call
        run(2)
    for _ in range(reps + 1):
        t = time.perf_counter()
        run(64)
        ts.append(time.perf_counter() - t)
ms = [round(1000 * t, 1) for t in ts]
print(json.dumps({"tuned": tuned, "first_ms": ms[0], "ms": statistics.median(ms[1:])}))
"""

MEMORY = """
import sys
from flowmnist.runtime import tune_allocator
tune_allocator()
from flowmnist.bench import peak_memory_child
peak_memory_child(sys.argv[1], "default", 128)
"""


def _run(code: str, env: dict[str, str], *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="multi-vardeq")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    for setting in ("system", "tuned"):
        env = {**os.environ, "FLOWMNIST_MALLOC": setting}
        for what in ("eval", "sample"):
            for path in ("plain", "compiled"):
                r = _run(CHILD, env, a.model, path, what, str(a.reps))
                print(
                    f"{a.model} malloc {setting:6s} {what:6s} {path:9s}: first call {r['first_ms']:6.1f} ms, "
                    f"then {r['ms']:6.1f} ms per 64 (tuned: {r['tuned']})",
                    flush=True,
                )
        mb = _run(MEMORY, env, a.model)["peak_rss_mb"]
        print(f"{a.model} malloc {setting:6s} training (fast path, batch 128): peak RSS {mb:,.0f} MB", flush=True)


if __name__ == "__main__":
    main()
