"""`flowmnist evaluate | table | sample`: one run's measured results, several runs' table, one run's
samples."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import FlowmnistError
from .common import (
    add_device,
    add_importance_samples,
    add_run_args,
    add_split,
    add_temperature,
    data_dir,
    nonneg_int,
    out_file,
    positive_int,
    runs,
)

# --- evaluate ---------------------------------------------------------------------------------------


def cmd_evaluate(a: argparse.Namespace) -> int:
    from ..evaluate import classification_table, evaluate_run, results_table

    (run,) = runs(a)
    r = evaluate_run(
        run,
        a.split,
        a.importance_samples,
        data_dir(a.data_dir),
        a.max_images,
        a.device,
        timing_reps=a.timing_reps,
        compile=a.compile,
        every=a.every,
        write=a.pretrained is None,  # a shipped run is read-only: its results.json is in the manifest
    )
    figures = _confusion_figures(run, r) if a.pretrained is None else []
    if a.json:
        print(json.dumps(r))
    else:
        print("\n\n".join(filter(None, [results_table([r]), classification_table([r])])))
        for path in figures:
            print(f"confusion matrix: {path}")
    return 0


def _confusion_figures(run: Path, r: dict) -> list[Path]:
    """A conditional run's confusion matrices, RUN_DIR/confusion_<split>.png, beside its results.json
    (not for a shipped run, which is read-only; `flowmnist report` draws them from results.json)."""
    if not r.get("confusion") or not Path(run).is_dir():
        return []
    from ..evaluate import model_name
    from ..figures import plot_confusion

    name = model_name(r)
    return [
        plot_confusion(m, Path(run) / f"confusion_{split}.png", f"{name}, {split}")
        for split, m in r["confusion"].items()
    ]


def add_evaluate_command(sub) -> None:
    e = sub.add_parser("evaluate", help="bpd per split, inference and sampling time; writes results.json")
    add_run_args(e, many=False)
    add_split(e, action="append", help="split to evaluate (repeatable; default: all the data has)")
    add_importance_samples(e)
    e.add_argument("--data-dir", help="evaluate on this directory (default: the run's own data)")
    e.add_argument("--max-images", type=positive_int, help="evaluate only the first N images of each split")
    e.add_argument(
        "--every", type=positive_int, default=1, metavar="N", help="evaluate every N-th image of each split (default 1)"
    )
    e.add_argument("--timing-reps", type=positive_int, default=5, help="timed repetitions (median; default 5)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    add_device(e)
    e.add_argument(
        "--compile", action="store_true", help="torch.compile the coupling nets: faster on many images, ~1 min warm-up"
    )
    e.set_defaults(func=cmd_evaluate)


# --- table ------------------------------------------------------------------------------------------


def cmd_table(a: argparse.Namespace) -> int:
    from ..evaluate import results_table
    from ..runs import shipped_name

    results = []
    for run in runs(a):
        path = run / "results.json"
        if not path.is_file():
            raise FlowmnistError(f"{path}: no results; run `flowmnist evaluate {run}` first")
        try:
            r = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise FlowmnistError(f"{path}: not valid JSON ({e})") from e
        name = shipped_name(run)  # two shipped runs of one architecture (a longer budget) stay apart
        results.append(r | {"name": name} if name else r)
    print(results_table(results))
    return 0


def add_table_command(sub) -> None:
    tb = sub.add_parser("table", help="Markdown results table from runs' results.json")
    add_run_args(tb, many=True)
    tb.set_defaults(func=cmd_table)


# --- sample -----------------------------------------------------------------------------------------


def _digit(s: str) -> int | str:
    """--digit: 0..9, or all."""
    if s == "all" or s in tuple("0123456789"):
        return s if s == "all" else int(s)
    raise argparse.ArgumentTypeError(f"must be a digit 0-9 or all, got {s!r}")


def cmd_sample(a: argparse.Namespace) -> int:
    import torch

    from ..plots import save_grid
    from ..runs import load_model, run_title, shipped_name

    out = out_file(a.out)
    (run,) = runs(a)
    model, cfg = load_model(run, a.device)
    name = shipped_name(run) or run_title(cfg.model, cfg.conditional, cfg.dataset)  # two shipped runs share a model
    if a.digit is not None and not cfg.conditional:
        raise FlowmnistError(f"--digit: {run} is an unconditional {cfg.model} run; train one with --conditional")
    if a.digit == "all":
        from ..figures import save_digit_grid

        save_digit_grid(model, out, name, a.n or 10, a.temperature, a.seed)
        print(out)
        return 0
    g = torch.Generator(device=a.device).manual_seed(a.seed)
    images = model.sample(a.n or 64, temperature=a.temperature, generator=g, y=a.digit)
    what = "samples" if a.digit is None else f"samples of digit {a.digit}"
    save_grid(images, out, title=f"{name} {what} (T={a.temperature:g})")
    print(out)
    return 0


def add_sample_command(sub) -> None:
    s = sub.add_parser("sample", help="one run's generated digits as a PNG grid (samples.png)")
    add_run_args(s, many=False)
    s.add_argument(
        "--n", type=positive_int, help="number of samples (default 64); with --digit all, per digit (default 10)"
    )
    s.add_argument(
        "--digit",
        type=_digit,
        metavar="D",
        help="a conditional run's digit 0-9, or all: a 10-row grid, row d the samples of digit d",
    )
    s.add_argument("--out", default="samples.png", help="PNG file to write")
    s.add_argument("--seed", type=nonneg_int, default=0)
    add_temperature(s)
    add_device(s)
    s.set_defaults(func=cmd_sample)
