"""What every command shares: the one-line parser, option types, the options several commands take
(device, splits, importance samples, run directories / --pretrained, data directories), and the paths
they resolve to."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from ..config import FlowmnistError, prepare_output
from ..data import SPLITS


class Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line (no usage block) naming the option and the problem."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


# --- option types: each refuses a bad value in one line naming what it wants -----------------------


def _int_at_least(s: str, low: int, what: str) -> int:
    """argparse type: an integer >= ``low``, else "must be a {what} integer"."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a {what} integer, got {s!r}") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"must be a {what} integer, got {s!r}")
    return v


def positive_int(s: str) -> int:
    return _int_at_least(s, 1, "positive")


def nonneg_int(s: str) -> int:
    return _int_at_least(s, 0, "non-negative")


def positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s!r}") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {s!r}")
    return v


def _float_in(s: str, lo: float, hi: float, closed_hi: bool) -> float:
    want = f"a number in [{lo:g}, {hi:g}{']' if closed_hi else ')'}"
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {want}, got {s!r}") from None
    if not (lo <= v <= hi if closed_hi else lo <= v < hi):
        raise argparse.ArgumentTypeError(f"must be {want}, got {s!r}")
    return v


def unit_float(s: str) -> float:
    """A number in [0, 1]."""
    return _float_in(s, 0.0, 1.0, closed_hi=True)


def ema_decay(s: str) -> float:
    """A number in [0, 1)."""
    return _float_in(s, 0.0, 1.0, closed_hi=False)


def nonneg_float(s: str) -> float:
    return _float_in(s, 0.0, math.inf, closed_hi=False)


# --- options several commands take, each declared here once ---------------------------------------


def add_device(p: argparse.ArgumentParser, default: str = "cpu", help: str | None = None) -> None:
    p.add_argument("--device", default=default, help=help or f"cpu, cuda or cuda:N (default {default})")


def add_split(p: argparse.ArgumentParser, *flags: str, help: str, **kwargs) -> None:
    """A split option (--split unless ``flags``): one of data.SPLITS."""
    p.add_argument(*(flags or ("--split",)), choices=SPLITS, help=help, **kwargs)


def add_importance_samples(p: argparse.ArgumentParser, what: str = "bound") -> None:
    p.add_argument(
        "--importance-samples",
        type=positive_int,
        default=8,
        metavar="K",
        help=f"dequantization samples K of the importance-weighted {what} (default 8)",
    )


def add_run_args(p: argparse.ArgumentParser, many: bool) -> None:
    """RUN_DIR (or several) and/or --pretrained NAME: a shipped model instead of a run directory."""
    from ..runs import pretrained_names

    names = ", ".join(pretrained_names()) or "none shipped"
    if many:
        p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="run directories")
        p.add_argument(
            "--pretrained",
            nargs="+",
            action="extend",
            metavar="NAME",
            help=f"shipped models by name, or all ({names}); after any RUN_DIRs",
        )
    else:
        p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="run directory")
        p.add_argument("--pretrained", metavar="NAME", help=f"a shipped model instead of RUN_DIR ({names})")


def add_figure_data(p: argparse.ArgumentParser) -> None:
    """--data-dir of the commands that draw real digits (resolved by ``figure_data``)."""
    p.add_argument(
        "--data-dir",
        help="real digits for every run from this directory (default: each run's own data, $FLOWMNIST_DATA for "
        "the MNIST runs; for shipped models, the validation digits shipped with them)",
    )


# --- what the shared options resolve to ------------------------------------------------------------


def data_dir(arg: str | None) -> str | None:
    """--data-dir, else $FLOWMNIST_DATA, else None (the download cache)."""
    d = arg or os.environ.get("FLOWMNIST_DATA") or None
    return str(Path(d).resolve()) if d else None


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch (or a plain process): the one that prints results and errors."""
    return os.environ.get("RANK", "0") == "0"


def out_file(arg: str, option: str = "--out") -> Path:
    """An output file path: not an existing directory, its folder made (``config.prepare_output``)."""
    return prepare_output(arg, option)


def out_dir(arg: str) -> Path:
    """An output folder (--out), made."""
    return prepare_output(arg, "--out", is_dir=True)


def runs(a: argparse.Namespace) -> list[Path]:
    """The run directories of a command: its RUN_DIRs, then its verified shipped runs."""
    from ..runs import pretrained_runs

    given = [Path(r) for r in getattr(a, "run_dirs", None) or ([a.run_dir] if getattr(a, "run_dir", None) else [])]
    shipped = a.pretrained if isinstance(a.pretrained, list) else [a.pretrained] if a.pretrained else []
    if not given and not shipped:
        raise FlowmnistError("give a RUN_DIR or --pretrained NAME")
    if shipped and "run_dir" in vars(a) and given:
        raise FlowmnistError("give either RUN_DIR or --pretrained NAME, not both")
    return given + pretrained_runs(shipped)


def figure_data(a: argparse.Namespace) -> str | dict[str, str] | None:
    """Real digits for figures, each run's from its own dataset: --data-dir for every run (the user
    named it); else, when every run is a shipped one, the validation images shipped with them,
    {dataset: directory} (no download); else $FLOWMNIST_DATA for the MNIST runs, {"mnist": directory};
    else None (each run's own data)."""
    from ..runs import shipped_digits_by_dataset

    if getattr(a, "data_dir", None):
        return data_dir(a.data_dir)
    if a.pretrained and not getattr(a, "run_dirs", None):
        return shipped_digits_by_dataset()
    env = data_dir(None)
    return {"mnist": env} if env else None


def print_paths(paths) -> int:
    for p in paths:
        print(p)
    return 0
