"""`flowmnist curves | compare-samples | interpolate | dequant | concepts | report`: figures of one or more runs
into an output folder, and the report that holds them all."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .common import (
    add_device,
    add_figure_data,
    add_hidden_alias,
    add_run_args,
    add_temperature,
    data_dir,
    figure_data,
    nonneg_int,
    out_dir,
    positive_int,
    print_paths,
    runs,
)


def _runs_and_out(p: argparse.ArgumentParser, help_text: str = "output folder") -> None:
    add_run_args(p, many=True)
    p.add_argument("--out", required=True, help=help_text)


# --- curves -------------------------------------------------------------------------------------------


def cmd_curves(a: argparse.Namespace) -> int:
    from ..figures import plot_curves

    return print_paths(plot_curves(runs(a), out_dir(a.out)))


def add_curves_command(sub) -> None:
    c = sub.add_parser("curves", help="train and val bpd vs step of one or more runs (train_log.png, val_log.png)")
    _runs_and_out(c)
    c.set_defaults(func=cmd_curves)


# --- samples ------------------------------------------------------------------------------------------


def cmd_samples(a: argparse.Namespace) -> int:
    from ..figures import plot_samples

    return print_paths(plot_samples(runs(a), out_dir(a.out), a.n, a.seed, a.temperature, a.device))


def add_samples_command(sub) -> None:
    s = sub.add_parser(
        "compare-samples",
        help="several runs' sample grids side by side in one figure (samples.png)",
    )
    _runs_and_out(s)
    s.add_argument("--n", type=positive_int, default=36, help="samples per run (default 36)")
    s.add_argument("--seed", type=nonneg_int, default=0)
    add_temperature(s)
    add_device(s)
    s.set_defaults(func=cmd_samples)


# --- interpolate --------------------------------------------------------------------------------------


def cmd_interpolate(a: argparse.Namespace) -> int:
    from ..figures import plot_interpolations

    out = out_dir(a.out)
    paths = plot_interpolations(runs(a), out, a.pairs, a.walk_images, a.seed, a.spherical, figure_data(a), a.device)
    return print_paths(paths)


def _add_walk_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", type=positive_int, default=2, help="digit pairs per run (default 2)")
    p.add_argument("--walk-images", type=positive_int, default=8, help="images per walk, ends included (default 8)")
    add_hidden_alias(p, "--steps", "walk_images", type=positive_int)


def add_interpolate_command(sub) -> None:
    i = sub.add_parser("interpolate", help="latent walks between real digits (interpolation.png)")
    _runs_and_out(i)
    _add_walk_options(i)
    i.add_argument("--seed", type=nonneg_int, default=0, help="chooses the digit pairs (encoding is deterministic)")
    i.add_argument("--spherical", action="store_true", help="spherical (slerp) instead of linear interpolation")
    add_figure_data(i)
    add_device(i)
    i.set_defaults(func=cmd_interpolate)


# --- dequant ------------------------------------------------------------------------------------------


def cmd_dequant(a: argparse.Namespace) -> int:
    from ..figures import plot_dequant

    out = out_dir(a.out)
    return print_paths(plot_dequant(runs(a), out, a.images, a.draws, a.seed, figure_data(a), a.device))


def _add_images_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=positive_int, default=64, help="real digits to dequantize (default 64)")


def add_dequant_command(sub) -> None:
    d = sub.add_parser("dequant", help="distribution of the dequantized values v = x + u (dequant_MODEL.png)")
    _runs_and_out(d)
    _add_images_option(d)
    d.add_argument("--draws", type=positive_int, default=1, help="noise draws per digit (default 1)")
    d.add_argument("--seed", type=nonneg_int, default=0)
    add_figure_data(d)
    add_device(d)
    d.set_defaults(func=cmd_dequant)


# --- concepts -----------------------------------------------------------------------------------------


def cmd_concepts(a: argparse.Namespace) -> int:
    from ..toy import fit_toy_noting, plot_concepts

    out = out_dir(a.out)
    fit, notes = fit_toy_noting(a.probs, a.seed)
    for note in notes:
        print(f"flowmnist: note: {note}", file=sys.stderr)
    return print_paths(plot_concepts(fit, out))


def _add_probs_option(p: argparse.ArgumentParser) -> None:
    from ..toy import DEFAULT_PROBS

    p.add_argument(
        "--probs", type=float, nargs="+", default=list(DEFAULT_PROBS), help="probabilities of 0, 1, ... (normalised)"
    )


def add_concepts_command(sub) -> None:
    k = sub.add_parser("concepts", help="dequantization explained on a toy 1-D distribution (concept_*.png)")
    k.add_argument("--out", required=True, help="output folder")
    _add_probs_option(k)
    k.add_argument("--seed", type=nonneg_int, default=0)
    k.set_defaults(func=cmd_concepts)


# --- report -------------------------------------------------------------------------------------------


# How each report option's value is read (``report.ReportOptions``: the "check" of its field).
REPORT_CHECKS = {
    "positive": dict(type=positive_int),
    "nonneg": dict(type=nonneg_int),
    "floats": dict(type=float, nargs="+"),
    "dir": dict(),
}


def cmd_report(a: argparse.Namespace) -> int:
    from ..report import ReportOptions, build_report

    out = out_dir(a.out)
    options = {f.name: getattr(a, f.metadata["flag"]) for f in dataclasses.fields(ReportOptions)}
    if options["ood_data"]:
        options["ood_data"] = data_dir(options["ood_data"])
    index = build_report(
        runs(a),
        out,
        data_dir=figure_data(a),
        device=a.device,
        notice=lambda msg: print(f"flowmnist report: note: {msg}", file=sys.stderr),
        **options,
    )
    print(index)
    return 0


def add_report_command(sub) -> None:
    from ..report import ReportOptions

    r = sub.add_parser("report", help="all figures and the results table in one static index.html")
    _runs_and_out(r, "output folder (index.html and the PNGs)")
    for f in dataclasses.fields(ReportOptions):
        m = f.metadata
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        kw = dict(REPORT_CHECKS[m["check"]], default=default, help=m["help"] or None, metavar=m["metavar"])
        r.add_argument("--" + m["flag"].replace("_", "-"), **kw)
    add_hidden_alias(r, "--steps", "walk_images", type=positive_int)
    add_figure_data(r)
    add_device(r)
    r.set_defaults(func=cmd_report)
