"""What every command shares: the one-line parser, option types, the options several commands take
(device, splits, importance samples, run directories / --pretrained, data directories), and the paths
they resolve to."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from ..config import Config, FlowmnistError, prepare_output
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


def add_hidden_alias(p: argparse.ArgumentParser, flag: str, dest: str, **kwargs) -> None:
    """An old spelling of an option, kept working and left out of --help (its default is the option's)."""
    p.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)


def print_paths(paths) -> int:
    for p in paths:
        print(p)
    return 0


# --- what the scoring commands (score, ood, classify) and the sampling ones share --------------------


def add_temperature(p: argparse.ArgumentParser) -> None:
    """--temperature of a sampling command."""
    p.add_argument("--temperature", type=positive_float, default=1.0, help="prior std scale (1.0: exact)")


def add_scoring_args(p: argparse.ArgumentParser) -> None:
    """The options of a command that scores images with one model: the run, --max-images, K, device."""
    add_run_args(p, many=False)
    p.add_argument("--max-images", type=positive_int, metavar="N", help="only the first N images (of each set)")
    add_importance_samples(p, "bpd")
    add_device(p)


def score_format(a: argparse.Namespace) -> str:
    """The output format, "csv" or "json": --out's extension when given, else --json's choice."""
    if a.out is None:
        return "json" if a.json else "csv"
    suffix = Path(a.out).suffix.lower()
    if suffix not in (".csv", ".json"):
        raise FlowmnistError(f"--out {a.out}: must end in .csv or .json")
    if a.json and suffix == ".csv":
        raise FlowmnistError(f"--json and --out {a.out} disagree; use a .json file name")
    out_file(a.out)
    return suffix[1:]


def score_input(a: argparse.Namespace, cfg: Config):
    """(uint8 images, labels, source description) for `score`: a data directory's split (an unlabelled
    image's label None), or PNGs (each labelled by its file); images of the run's size only."""
    from ..data import NO_LABEL, load_data, png_files, read_png_digits

    if a.png:
        if a.split:
            raise FlowmnistError("--split applies to --data-dir, not to --png")
        files = png_files(a.png)[: a.max_images]
        return read_png_digits(files, cfg.image_shape), [str(f) for f in files], {"png": [str(p) for p in a.png]}
    split = a.split or "val"
    data = load_data(cfg, data_dir(a.data_dir))
    images, labels = data.split(split)
    labels = [None if y == NO_LABEL else y for y in labels[: a.max_images].tolist()]
    return images[: a.max_images], labels, {"data_dir": str(data.root), "split": split}


def csv_text(rows: list[dict]) -> str:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def emit(a: argparse.Namespace, text: str) -> None:
    """The rows to --out (written whole, or not at all), else to stdout."""
    from ..config import atomic_write_bytes

    if a.out:
        atomic_write_bytes(out_file(a.out), text.encode())
        print(a.out)
    else:
        sys.stdout.write(text)
