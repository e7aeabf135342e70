"""Trial (session 1): does torch.compile of the whole log-density pay for itself on a CPU? Kept for the
record; the package now compiles the nets' blocks instead (nets.compile_nets, measured by
`flowmnist bench`), and under compilation the fast modules use plain ops, so `--fast` traces too.

Times multi-vardeq training steps (batch 128, Adam) with `torch.compile(model.log_prob_single)` and
eagerly, on the same weights, in one process: compiled x4 (the first includes compilation), eager x3,
compiled x3. `--fast` uses the fast modules. Run: `python benchmarks/compile_trial.py [--fast]`.
"""

import math
import sys
import time

import torch

from flowmnist.models import build_model

torch.manual_seed(0)
model = build_model("multi-vardeq", fast="--fast" in sys.argv)
x = torch.randint(0, 256, (128, 1, 28, 28))
opt = torch.optim.Adam(model.parameters(), lr=1e-4)
compiled = torch.compile(model.log_prob_single)


def step(bpd) -> float:
    t = time.perf_counter()
    loss = bpd(x).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return round(time.perf_counter() - t, 2)


def compiled_bpd(x):
    return -compiled(x) / (784 * math.log(2))


print("compiled (s/step):", [step(compiled_bpd) for _ in range(4)], flush=True)
print("eager (s/step):", [step(model.bpd) for _ in range(3)], flush=True)
print("compiled (s/step):", [step(compiled_bpd) for _ in range(3)], flush=True)
