"""Command line: `flowmnist train | evaluate | table | sample | bench`. Each subcommand is a small function
calling the modules; user errors print one line and exit 2 (`--debug` shows the traceback)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import Config, FlowmnistError, load_checkpoint
from .models import MODELS

DEFAULTS = Config()


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line (no usage block) naming the option and the problem."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s!r}")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s!r}") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {s!r}")
    return v


def _nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {s!r}")
    return v


def _data_dir(arg: str | None) -> str | None:
    """--data-dir, else $FLOWMNIST_DATA, else None (the download cache)."""
    d = arg or os.environ.get("FLOWMNIST_DATA") or None
    return str(Path(d).resolve()) if d else None


def _writable_parent(path: Path, option: str) -> None:
    parent = path.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise FlowmnistError(f"{option} {path}: directory {parent} is not writable")


def cmd_train(a: argparse.Namespace) -> int:
    from .train import train

    given = {k: v for k, v in vars(a).items() if v is not None}
    run_dir = Path(a.out)
    if a.resume and (run_dir / "last.pt").is_file():
        cfg = Config.from_dict(load_checkpoint(run_dir / "last.pt")["config"])
    else:
        cfg = Config(data_dir=_data_dir(a.data_dir))
    for key in ("model", "seed", "epochs", "minutes", "batch_size", "lr", "log_every", "val_every"):
        if key in given:
            setattr(cfg, key, given[key])
    if "data_dir" in given:
        cfg.data_dir = _data_dir(a.data_dir)
    if a.reference:
        cfg.fast = False
    _writable_parent(run_dir, "--out")
    summary = train(cfg, run_dir, resume=a.resume, force=a.force, device=a.device)
    print(json.dumps(summary))
    if summary["stopped_by"] in ("SIGINT", "SIGTERM"):
        print(
            f"flowmnist train: stopped by {summary['stopped_by']}; checkpoint saved, continue with --resume",
            file=sys.stderr,
        )
        return 130 if summary["stopped_by"] == "SIGINT" else 143
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .evaluate import evaluate_run, results_table

    r = evaluate_run(a.run_dir, a.split, a.importance_samples, _data_dir(a.data_dir), a.max_images, a.device)
    print(json.dumps(r) if a.json else results_table([r]))
    return 0


def cmd_table(a: argparse.Namespace) -> int:
    from .evaluate import results_table

    results = []
    for run in a.run_dirs:
        path = Path(run) / "results.json"
        if not path.is_file():
            raise FlowmnistError(f"{path}: no results; run `flowmnist evaluate {run}` first")
        try:
            results.append(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise FlowmnistError(f"{path}: not valid JSON ({e})") from e
    print(results_table(results))
    return 0


def cmd_sample(a: argparse.Namespace) -> int:
    import torch

    from .evaluate import load_model
    from .plots import save_grid

    out = Path(a.out)
    _writable_parent(out, "--out")
    model, cfg = load_model(a.run_dir, a.device)
    g = torch.Generator(device=a.device).manual_seed(a.seed)
    images = model.sample(a.n, temperature=a.temperature, generator=g)
    save_grid(images, out, title=f"{cfg.model} samples (T={a.temperature:g})")
    print(out)
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from .bench import bench_table, run_bench

    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    models = a.models.split(",") if a.models else None
    bad = [m for m in models or [] if m not in MODELS]
    if bad:
        raise FlowmnistError(f"--models: unknown model {bad[0]!r}; choose from {', '.join(MODELS)}")
    say = None if a.json else (lambda msg: print(f"flowmnist bench: {msg} ...", file=sys.stderr, flush=True))
    b = run_bench(models, a.steps, a.batch_size, memory=not a.no_memory, progress=say)
    print(json.dumps(b) if a.json else bench_table(b))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="flowmnist", description="Normalizing flows on MNIST: train, evaluate, sample.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a model into a run directory")
    t.add_argument("--model", choices=MODELS, help=f"model variant (default {DEFAULTS.model})")
    t.add_argument("--data-dir", help="directory with MNIST IDX files (default: $FLOWMNIST_DATA, else download)")
    t.add_argument("--out", default="runs/run", help="run directory (default runs/run)")
    t.add_argument("--epochs", type=_positive_int, help=f"epochs (default {DEFAULTS.epochs})")
    t.add_argument("--minutes", type=_positive_float, help="wall-clock budget; stops at a step boundary")
    t.add_argument("--batch-size", type=_positive_int, help=f"batch size (default {DEFAULTS.batch_size})")
    t.add_argument("--lr", type=_positive_float, help=f"Adam learning rate (default {DEFAULTS.lr})")
    t.add_argument("--seed", type=_nonneg_int, help=f"random seed (default {DEFAULTS.seed})")
    t.add_argument(
        "--log-every", type=_positive_int, help=f"steps per train-bpd log row (default {DEFAULTS.log_every})"
    )
    t.add_argument("--val-every", type=_nonneg_int, help="steps between validations (default 0: each epoch)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    t.add_argument("--force", action="store_true", help="replace a run already in --out")
    t.add_argument("--device", default="cpu", help="torch device (default cpu)")
    t.add_argument("--reference", action="store_true", help="train with the plain reference code, not the fast path")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="bpd per split, inference and sampling time; writes results.json")
    e.add_argument("run_dir")
    e.add_argument(
        "--split",
        action="append",
        choices=("train", "val", "test"),
        help="split to evaluate (repeatable; default: all the data has)",
    )
    e.add_argument(
        "--importance-samples",
        type=_positive_int,
        default=8,
        help="dequantization samples K of the importance-weighted bound (default 8)",
    )
    e.add_argument("--data-dir", help="evaluate on this directory (default: the run's own data)")
    e.add_argument("--max-images", type=_positive_int, help="evaluate only the first N images of each split")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--device", default="cpu")
    e.set_defaults(func=cmd_evaluate)

    tb = sub.add_parser("table", help="Markdown results table from runs' results.json")
    tb.add_argument("run_dirs", nargs="+")
    tb.set_defaults(func=cmd_table)

    s = sub.add_parser("sample", help="a grid of generated digits as a PNG")
    s.add_argument("run_dir")
    s.add_argument("--n", type=_positive_int, default=64, help="number of samples (default 64)")
    s.add_argument("--out", default="samples.png", help="PNG file to write")
    s.add_argument("--seed", type=_nonneg_int, default=0)
    s.add_argument("--temperature", type=_positive_float, default=1.0, help="prior std scale (1.0: exact)")
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=cmd_sample)

    bn = sub.add_parser("bench", help="reference vs fast path: train img/s, eval and sampling ms, peak memory")
    bn.add_argument("--models", help=f"comma-separated subset of {','.join(MODELS)} (default all)")
    bn.add_argument("--steps", type=_positive_int, default=5, help="timed training steps per path (default 5)")
    bn.add_argument("--batch-size", type=_positive_int, default=128, help="training batch size (default 128)")
    bn.add_argument("--threads", type=_positive_int, help="torch intra-op threads (default: torch's choice)")
    bn.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    bn.add_argument("--json", action="store_true", help="print one JSON object")
    bn.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FlowmnistError as e:
        if args.debug:
            raise
        print(f"flowmnist {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flowmnist {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
