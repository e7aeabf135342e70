"""One static HTML report of trained runs: results table, every figure, the configs, the commands.

``index.html`` and its PNGs live in one folder and link each other by relative paths, with inline
CSS and no external resource (no CDN, no web fonts): it opens from disk, offline, and can be
copied or zipped as a unit. A tiny inline script records on <body> whether every image loaded
(data-images-ok, data-images-count), which the headless-browser test reads back.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

from .commands import argv, runs_argv, shell_line
from .config import atomic_write_bytes
from .evaluate import classification_rows, results_rows
from .figures import (
    DataDirs,
    LoadedRun,
    file_slug,
    load_runs,
    plot_confusion,
    plot_curves,
    plot_dequant,
    plot_interpolations,
    plot_ood_histograms,
    plot_samples,
    save_digit_grid,
)
from .runs import run_title, shipped_name
from .toy import DEFAULT_PROBS, fit_toy_noting, plot_concepts

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; color: #222; }
h1, h2 { font-weight: 600; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 1em 0; } th, td { border: 1px solid #ccc; padding: .3em .7em; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; } pre { background: #f6f6f6; padding: .7em; overflow-x: auto; }
code { font-family: ui-monospace, Menlo, Consolas, monospace; }
"""

# Written by the page itself once everything has loaded; harmless offline, read by the tests.
CHECK_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.every(function (im) { return im.complete && im.naturalWidth > 0; });
  document.body.dataset.imagesOk = String(ok);
  document.body.dataset.imagesCount = String(imgs.length);
});
"""


def _figure(path: Path, out_dir: Path, caption: str) -> str:
    rel = path.relative_to(out_dir).as_posix()
    return (
        f'<figure><img src="{html.escape(rel)}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


class Section(NamedTuple):
    """What a section adds to the page: its HTML, and the stand-alone command of each of its figures."""

    html: str
    commands: list[list[str]] = []


def _option(default, flag: str, check: str, help_text: str, metavar: str | None = None) -> Any:
    """A report option: its default, its flag (an argparse dest: ``--`` + flag with ``_`` as ``-``), the
    check of its value (a name in ``cli.figures.REPORT_CHECKS``), its help and metavar."""
    return field(default=default, metadata={"flag": flag, "check": check, "help": help_text, "metavar": metavar})


@dataclass(frozen=True)
class ReportOptions:
    """What the report shows, declared once: ``flowmnist report``'s parser, ``build_report`` and the
    report's own command line (``report_argv``) are all made from these fields."""

    samples: int = _option(36, "n", "positive", "samples per run (default 36)")
    pairs: int = _option(2, "pairs", "positive", "digit pairs per run (default 2)")
    steps: int = _option(8, "walk_images", "positive", "images per walk, ends included (default 8)")
    dequant_images: int = _option(64, "images", "positive", "real digits to dequantize (default 64)")
    probs: tuple[float, ...] = _option(DEFAULT_PROBS, "probs", "floats", "probabilities of 0, 1, ... (normalised)")
    seed: int = _option(0, "seed", "nonneg", "")
    ood_data: str | None = _option(
        None, "ood_data", "dir", "add an OOD section: each run's held-out images against this data directory's", "DIR"
    )
    ood_images: int = _option(500, "ood_images", "positive", "images of each set in the OOD section", "N")

    @property
    def ood(self) -> tuple[str, int] | None:
        """(OOD IDX directory, images of each set) for the OOD section, or None."""
        return (self.ood_data, self.ood_images) if self.ood_data else None

    def argv_options(self) -> dict[str, Any]:
        """The options as ``commands.argv`` spells them."""
        values = {f.metadata["flag"]: getattr(self, f.name) for f in fields(ReportOptions)}
        values["probs"] = [float(p) for p in self.probs]
        if not self.ood_data:  # no OOD section: its size says nothing
            values["ood_images"] = None
        return values


def split_words(splits: list[str]) -> str:
    """Held-out split(s) in words, for a caption."""
    names = {"test": "test", "val": "validation"}
    kinds = sorted({names[s] for s in splits})
    return f"{kinds[0]} split" if len(kinds) == 1 else "held-out split (the row labels name it)"


@dataclass(frozen=True, kw_only=True)
class ReportSpec(ReportOptions):
    """A report being made: its runs (each loaded once, with its label and digits), output folder,
    options, and each run's results.json. Read-only: each section returns what it adds."""

    runs: list[LoadedRun]
    out_dir: Path
    temperatures: tuple[float, ...] = (1.0, 0.7)
    data_dir: DataDirs = None  # one directory, or {dataset: directory} for shipped runs
    results: dict[Path, dict] = field(default_factory=dict)  # each run's results.json, where it has one

    @property
    def run_dirs(self) -> list[Path]:
        return [r.path for r in self.runs]

    @property
    def labels(self) -> list[str]:
        return [r.label for r in self.runs]

    @property
    def splits(self) -> list[str]:
        """Each run's held-out split, which the figures show."""
        return [r.split for r in self.runs]

    def split_words(self) -> str:
        """The runs' held-out split(s) in words, for a caption."""
        return split_words(self.splits)

    @property
    def data_opt(self) -> str | None:
        """--data-dir of the figure commands: the one directory given, if any."""
        return self.data_dir if isinstance(self.data_dir, str) else None

    def runs_argv(self, command: str, **options) -> list[str]:
        """A figure command over every run of the report, writing into its folder."""
        return runs_argv(command, self.run_dirs, out=self.out_dir, **options)


def read_results(run_dirs: list[Path]) -> dict[Path, dict]:
    """Each run's results.json, where `flowmnist evaluate` wrote one (and it reads)."""
    results = {}
    for r in run_dirs:
        try:
            results[r] = json.loads((r / "results.json").read_text())
        except (OSError, json.JSONDecodeError):
            pass
    return results


def _evaluate_hint() -> str:
    return f"<code>{html.escape(shell_line(argv('evaluate', 'RUN_DIR')))}</code>"


def results_section(spec: ReportSpec) -> Section:
    """The results table, from each run's results.json where `flowmnist evaluate` wrote one."""
    results = list(spec.results.values())
    missing = [str(r) for r in spec.run_dirs if r not in spec.results]
    body = results_rows(results).html() if results else ""
    classes = classification_rows(results)
    body += classes.html() if classes else ""
    if missing:
        body += "<p>No results.json for: " + ", ".join(f"<code>{html.escape(m)}</code>" for m in missing)
        body += f" (run {_evaluate_hint()} to add them).</p>"
    return Section(f"<h2>Results</h2>\n{body}")


def curves_section(spec: ReportSpec) -> Section:
    figs = plot_curves(spec.run_dirs, spec.out_dir)
    return Section(
        "<h2>Training curves</h2>\n"
        + _figure(figs[0], spec.out_dir, "Training bpd (mean over each logging interval) vs step.")
        + _figure(figs[1], spec.out_dir, "Validation bpd (single-sample bound, fixed noise) vs step."),
        [spec.runs_argv("curves")],
    )


def samples_section(spec: ReportSpec) -> Section:
    parts, commands = [], []
    for t in spec.temperatures:
        (fig,) = plot_samples(spec.runs, spec.out_dir, spec.samples, spec.seed, t)
        opts = {"n": spec.samples, "seed": spec.seed, "temperature": None if t == 1 else t}
        commands.append(spec.runs_argv("compare-samples", **opts))
        what = "the model's own distribution" if t == 1 else "the prior's spread scaled down: cleaner, less varied"
        parts.append(_figure(fig, spec.out_dir, f"{spec.samples} samples per run at T = {t:g} ({what})."))
    return Section("<h2>Samples</h2>\n" + "".join(parts), commands)


def _conditional_run(spec: ReportSpec, loaded: LoadedRun, per_digit: int) -> Section:
    """One class-conditional run's digit grid and its confusion matrices (from results.json)."""
    run, label, cfg = loaded.path, loaded.label, loaded.cfg
    path = spec.out_dir / f"digits_{file_slug(label)}.png"
    save_digit_grid(loaded.model, path, run_title(cfg.model, True, cfg.dataset), per_digit, 1.0, spec.seed)
    command = runs_argv("sample", [run], digit="all", n=per_digit, seed=spec.seed, out=path)
    parts = [_figure(path, spec.out_dir, f"{label}: {per_digit} samples of each digit, row d = digit d, T = 1.")]
    confusion = spec.results.get(run, {}).get("confusion") or {}
    for split, matrix in confusion.items():
        out = spec.out_dir / f"confusion_{file_slug(label)}_{split}.png"
        fig = plot_confusion(matrix, out, f"{label}, {split}")
        caption = f"{label}: classifier argmax_y p(x | y) p(y) on {split}; rows: true digit (from results.json)."
        parts.append(_figure(fig, spec.out_dir, caption))
    if not confusion:
        parts.append(
            f"<p>No confusion matrix for <code>{html.escape(str(run))}</code>: run {_evaluate_hint()} to add it.</p>"
        )
    return Section("\n".join(parts), [command])


def conditional_section(spec: ReportSpec, per_digit: int = 10) -> Section:
    """Class-conditional runs: a 10-row grid of each (row d: digit d on demand) and, where evaluate has
    measured them (results.json), the confusion matrices of the flow as a Bayes classifier."""
    runs = [_conditional_run(spec, run, per_digit) for run in spec.runs if run.cfg.conditional]
    if not runs:
        return Section("")
    heading = "<h2>Digits on demand (class-conditional runs)</h2>\n"
    return Section(heading + "\n".join(r.html for r in runs), [c for r in runs for c in r.commands])


def interpolation_section(spec: ReportSpec) -> Section:
    figs, commands = [], []
    for spherical in (False, True):
        figs += plot_interpolations(spec.runs, spec.out_dir, spec.pairs, spec.steps, spec.seed, spherical)
        opts = {"pairs": spec.pairs, "walk_images": spec.steps, "seed": spec.seed, "spherical": spherical}
        commands.append(spec.runs_argv("interpolate", **opts, data_dir=spec.data_opt))
    return Section(
        "<h2>Interpolation</h2>\n"
        + _figure(
            figs[0],
            spec.out_dir,
            f"Linear walks between the latents of two real digits of each run's {spec.split_words()}, through "
            "that run's model, on its own dataset; ends are the inputs.",
        )
        + _figure(figs[1], spec.out_dir, "The same walks, spherical (slerp)."),
        commands,
    )


def dequant_section(spec: ReportSpec) -> Section:
    figs = plot_dequant(spec.runs, spec.out_dir, spec.dequant_images, 1, spec.seed)
    command = spec.runs_argv("dequant", images=spec.dequant_images, seed=spec.seed, data_dir=spec.data_opt)
    return Section(
        "<h2>Dequantization</h2>\n"
        + "".join(
            _figure(f, spec.out_dir, f"{label}: distribution of v = x + u over real digits of its {split} split.")
            for f, label, split in zip(figs, spec.labels, spec.splits, strict=True)
        ),
        [command],
    )


def concepts_section(spec: ReportSpec, notice: Callable[[str], None] | None) -> Section:
    fit, notes = fit_toy_noting(spec.probs, spec.seed)
    for note in notes if notice else []:
        notice(note)
    figs = plot_concepts(fit, spec.out_dir)
    command = argv("concepts", out=spec.out_dir, probs=[float(p) for p in spec.probs], seed=spec.seed)
    return Section(
        "<h2>Dequantization on a toy distribution</h2>\n"
        + "<p>A smooth density on uniformly dequantized values pays "
        + f"{fit.uniform_smooth_bits - fit.entropy_bits:.3f} bits over the entropy; "
        + f"with learned (variational) dequantization it pays {fit.variational_bits - fit.entropy_bits:.3f}.</p>\n"
        + "".join(_figure(f, spec.out_dir, f.stem.replace("_", " ")) for f in figs),
        [command],
    )


def _ood_run(spec: ReportSpec, loaded: LoadedRun, read: dict) -> Section:
    """One run's OOD table and histograms; ``read`` caches the OOD directory per train/val split rule."""
    from .data import load_data
    from .ood import BATCH_SIZES, compare, scores_rows

    ood_dir, n = spec.ood
    run, model, cfg, label = loaded.path, loaded.model, loaded.cfg, loaded.label
    inside, _, split = loaded.digits
    rule = (cfg.split_seed, cfg.val_fraction)
    data = read[rule] = read.get(rule) or load_data(cfg, ood_dir)
    ood_split = data.held_out
    inside, outside = inside[:n], data.split(ood_split)[0][:n]
    sizes = [m for m in BATCH_SIZES if m <= min((len(inside) + 1) // 2, len(outside))]  # batches both sets fill
    r, ins, outs = compare(model, inside, outside, batch_sizes=sizes)
    path = plot_ood_histograms(ins, outs, spec.out_dir / f"ood_{file_slug(label)}.png")
    opts = {"ood_data": ood_dir, "split": split, "ood_split": ood_split, "max_images": n, "batch_sizes": sizes}
    command = runs_argv("ood", [run], in_data=spec.data_opt, **opts, out=path)
    caption = (
        f"{label}: {r['in']['images']} of its {split} images (mean bpd {r['in']['mean_bpd']}) against "
        f"{r['ood']['images']} {ood_split} images of {ood_dir} (mean bpd {r['ood']['mean_bpd']}); high = OOD."
    )
    body = f"<h3>{html.escape(label)}</h3>\n" + scores_rows(r["scores"], digits=None).html()
    return Section(body + "\n" + _figure(path, spec.out_dir, caption), [command])


def ood_section(spec: ReportSpec) -> Section:
    """With ``spec.ood``: each run's own held-out images (as the figures use) against the OOD
    directory's (its test split where it has one, else val), every OOD score's AUROC, AUPR and FPR95
    (``ood.compare``, K = 8) and their histograms."""
    if spec.ood is None:
        return Section("")
    read: dict = {}
    runs = [_ood_run(spec, run, read) for run in spec.runs]
    heading = "<h2>Out-of-distribution scores</h2>\n"
    return Section(heading + "\n".join(r.html for r in runs), [c for r in runs for c in r.commands])


def configs_section(spec: ReportSpec) -> Section:
    return Section(
        "<h2>Run configs</h2>\n"
        + "".join(
            f"<h3>{html.escape(r.label)} <code>{_run_name(r.path)}</code></h3>\n<pre>"
            f"{html.escape(json.dumps(r.cfg.to_dict(), indent=2))}</pre>\n"
            for r in spec.runs
        )
    )


def report_argv(spec: ReportSpec) -> list[str]:
    """The command that makes this report."""
    return spec.runs_argv("report", **spec.argv_options(), data_dir=spec.data_opt)


def commands_section(spec: ReportSpec, commands: list[list[str]]) -> Section:
    return Section(
        "<h2>Commands</h2>\n<p>This report:</p>\n<pre>"
        + html.escape(shell_line(report_argv(spec)))
        + "</pre>\n<p>Each figure on its own:</p>\n<pre>"
        + html.escape("\n".join(map(shell_line, commands)))
        + "</pre>"
    )


def _run_name(run: Path) -> str:
    """A run as a user names it: ``--pretrained NAME`` for a shipped one, else its directory."""
    name = shipped_name(run)
    return html.escape(f"--pretrained {name}" if name else str(run))


def page(spec: ReportSpec, sections: list[str]) -> str:
    runs = ", ".join(
        f"{html.escape(lb)} (<code>{_run_name(r)}</code>)" for lb, r in zip(spec.labels, spec.run_dirs, strict=True)
    )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>flowmnist report</title>\n<style>{CSS}</style>\n<script>{CHECK_SCRIPT}</script>\n</head>\n<body>\n"
        f"<h1>flowmnist report</h1>\n<p>Runs: {runs}</p>\n" + "\n".join(sections) + "\n</body>\n</html>\n"
    )


def build_report(
    run_dirs: list[str | Path],
    out_dir: str | Path,
    data_dir: DataDirs = None,
    device: str = "cpu",
    notice: Callable[[str], None] | None = None,
    **options: Any,
) -> Path:
    """Make every figure into ``out_dir`` and write ``out_dir/index.html``; returns its path. ``options``:
    ``ReportOptions`` fields.

    The "commands" section lists, for each figure, the stand-alone CLI command that makes the same
    file (same runs, options and seed), so any figure can be re-made or varied on its own.
    """
    opts = ReportOptions(**options)
    runs = load_runs([Path(r) for r in run_dirs], data_dir, device)
    results = read_results([r.path for r in runs])
    spec = ReportSpec(**vars(opts), runs=runs, out_dir=Path(out_dir), data_dir=data_dir, results=results)
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    sections = [
        results_section(spec),
        curves_section(spec),
        samples_section(spec),
        conditional_section(spec),
        interpolation_section(spec),
        dequant_section(spec),
        concepts_section(spec, notice),
        ood_section(spec),
        configs_section(spec),
    ]
    sections.append(commands_section(spec, [c for s in sections for c in s.commands]))
    index = spec.out_dir / "index.html"
    atomic_write_bytes(index, page(spec, [s.html for s in sections if s.html]).encode())
    return index
