"""`flowmnist bench`: the plain code path, the fast ones and `train`'s default, timed side by side."""

from __future__ import annotations

import argparse
import json
import sys

from ..config import FlowmnistError
from ..models import MODELS
from .common import add_hidden_alias, positive_int


def cmd_bench(a: argparse.Namespace) -> int:
    from ..bench import bench_table, run_bench

    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    models = a.models.split(",") if a.models else None
    bad = [m for m in models or [] if m not in MODELS]
    if bad:
        raise FlowmnistError(f"--models: unknown model {bad[0]!r}; choose from {', '.join(MODELS)}")
    say = None if a.json else (lambda msg: print(f"flowmnist bench: {msg} ...", file=sys.stderr, flush=True))
    b = run_bench(models, a.timed_steps, a.batch_size, memory=not a.no_memory, progress=say)
    print(json.dumps(b) if a.json else bench_table(b))
    return 0


def add_bench_command(sub) -> None:
    bn = sub.add_parser(
        "bench", help="the plain code path vs the fast ones: train img/s, eval and sampling ms, peak memory"
    )
    bn.add_argument("--models", help=f"comma-separated subset of {','.join(MODELS)} (default all)")
    bn.add_argument("--timed-steps", type=positive_int, default=5, help="timed training steps per path (default 5)")
    add_hidden_alias(bn, "--steps", "timed_steps", type=positive_int)
    bn.add_argument("--batch-size", type=positive_int, default=128, help="training batch size (default 128)")
    bn.add_argument("--threads", type=positive_int, help="torch intra-op threads (default: torch's choice)")
    bn.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    bn.add_argument("--json", action="store_true", help="print one JSON object")
    bn.set_defaults(func=cmd_bench)
