"""One static HTML report of trained runs: results table, every figure, the configs, the commands.

``index.html`` and its PNGs live in one folder and link each other by relative paths, with inline
CSS and no external resource (no CDN, no web fonts): it opens from disk, offline, and can be
copied or zipped as a unit. A tiny inline script records on <body> whether every image loaded
(data-images-ok, data-images-count), which the headless-browser test reads back.
"""

from __future__ import annotations

import html
import json
import shlex
from collections.abc import Callable
from pathlib import Path

from .config import Config, atomic_write_bytes
from .evaluate import classification_table, results_table
from .figures import (
    plot_confusion,
    plot_curves,
    plot_dequant,
    plot_interpolations,
    plot_samples,
    run_labels,
    save_digit_grid,
)
from .runs import load_model, run_config
from .toy import DEFAULT_PROBS, fit_toy, plot_concepts

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


def markdown_table_html(md: str) -> str:
    """Render a pipe table (as ``results_table`` writes) to HTML; a ``---:`` column is right-aligned.
    Cells are escaped: model names and paths come from files."""
    lines = [ln.strip() for ln in md.strip().splitlines() if ln.strip()]
    if len(lines) < 2:
        return ""

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip("|").split("|")]

    header, align = cells(lines[0]), cells(lines[1])
    right = [a.endswith(":") for a in align]
    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for line in lines[2:]:
        row = cells(line)
        out.append(
            "<tr>"
            + "".join(
                f'<td class="num">{html.escape(c)}</td>' if r else f"<td>{html.escape(c)}</td>"
                for c, r in zip(row, right, strict=False)
            )
            + "</tr>"
        )
    out.append("</table>")
    return "\n".join(out)


def _command(*parts) -> str:
    return shlex.join(["flowmnist", *[str(p) for p in parts]])


def _figure(path: Path, out_dir: Path, caption: str) -> str:
    rel = path.relative_to(out_dir).as_posix()
    return (
        f'<figure><img src="{html.escape(rel)}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in label)


def _conditional_section(
    runs: list[tuple[str, Config, str]],
    results: dict[str, dict],
    out_dir: Path,
    seed: int,
    device: str,
    commands: list[str],
    per_digit: int = 10,
) -> str:
    """Class-conditional runs: a 10-row grid of each (row d: digit d on demand) and, where evaluate has
    measured them (results.json), the confusion matrices of the flow as a Bayes classifier."""
    parts = []
    for run, cfg, label in runs:
        path = out_dir / f"digits_{_slug(label)}.png"
        model, _ = load_model(run, device)
        save_digit_grid(model, path, f"{cfg.model} (conditional)", per_digit, 1.0, seed)
        commands.append(_command("sample", run, "--digit", "all", "--n", per_digit, "--seed", seed, "--out", path))
        parts.append(_figure(path, out_dir, f"{label}: {per_digit} samples of each digit, row d = digit d, T = 1."))
        confusion = results.get(run, {}).get("confusion") or {}
        for split, matrix in confusion.items():
            fig = plot_confusion(matrix, out_dir / f"confusion_{_slug(label)}_{split}.png", f"{label}, {split}")
            caption = f"{label}: classifier argmax_y p(x | y) p(y) on {split}; rows: true digit (from results.json)."
            parts.append(_figure(fig, out_dir, caption))
        if not confusion:
            parts.append(
                f"<p>No confusion matrix for <code>{html.escape(run)}</code>: run "
                "<code>flowmnist evaluate RUN_DIR</code> to add it.</p>"
            )
    return "<h2>Digits on demand (class-conditional runs)</h2>\n" + "\n".join(parts)


def build_report(
    run_dirs: list[str | Path],
    out_dir: str | Path,
    seed: int = 0,
    pairs: int = 2,
    steps: int = 8,
    samples: int = 36,
    dequant_images: int = 64,
    probs=DEFAULT_PROBS,
    data_dir: str | None = None,
    device: str = "cpu",
    notice: Callable[[str], None] | None = None,
) -> Path:
    """Make every figure into ``out_dir`` and write ``out_dir/index.html``; returns its path.

    The "commands" section lists, for each figure, the stand-alone CLI command that makes the same
    file (same runs, options and seed), so any figure can be re-made or varied on its own.
    """
    import warnings

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_dirs = [str(r) for r in run_dirs]
    configs = [run_config(r) for r in run_dirs]
    labels = run_labels([c.model for c in configs], run_dirs)
    data_opt = ["--data-dir", data_dir] if data_dir else []
    commands: list[str] = []
    sections: list[str] = []

    # Results table: from results.json where `flowmnist evaluate` wrote one.
    results, missing = {}, []
    for r in run_dirs:
        path = Path(r) / "results.json"
        try:
            results[r] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            missing.append(r)
    body = markdown_table_html(results_table(list(results.values()))) if results else ""
    body += markdown_table_html(classification_table(list(results.values())))
    if missing:
        body += "<p>No results.json for: " + ", ".join(f"<code>{html.escape(m)}</code>" for m in missing)
        body += " (run <code>flowmnist evaluate RUN_DIR</code> to add them).</p>"
    sections.append(f"<h2>Results</h2>\n{body}")

    figs = plot_curves(run_dirs, out_dir)
    commands.append(_command("curves", *run_dirs, "--out", out_dir))
    sections.append(
        "<h2>Training curves</h2>\n"
        + _figure(figs[0], out_dir, "Training bpd (mean over each logging interval) vs step.")
        + _figure(figs[1], out_dir, "Validation bpd (single-sample bound, fixed noise) vs step.")
    )

    figs = plot_samples(run_dirs, out_dir, samples, seed, 1.0, device)
    commands.append(_command("samples", *run_dirs, "--out", out_dir, "--n", samples, "--seed", seed))
    sections.append("<h2>Samples</h2>\n" + _figure(figs[0], out_dir, f"{samples} samples per run at T = 1."))

    conditional = [(r, c, lb) for r, c, lb in zip(run_dirs, configs, labels, strict=True) if c.conditional]
    if conditional:
        sections.append(_conditional_section(conditional, results, out_dir, seed, device, commands))

    figs = plot_interpolations(run_dirs, out_dir, pairs, steps, seed, False, data_dir, device)
    figs += plot_interpolations(run_dirs, out_dir, pairs, steps, seed, True, data_dir, device)
    interp = ["interpolate", *run_dirs, "--out", out_dir, "--pairs", pairs, "--steps", steps, "--seed", seed]
    commands += [_command(*interp, *data_opt), _command(*interp, "--spherical", *data_opt)]
    sections.append(
        "<h2>Interpolation</h2>\n"
        + _figure(figs[0], out_dir, "Linear walks between the latents of two real digits; ends are the inputs.")
        + _figure(figs[1], out_dir, "The same walks, spherical (slerp).")
    )

    figs = plot_dequant(run_dirs, out_dir, dequant_images, 1, seed, data_dir, device)
    commands.append(
        _command("dequant", *run_dirs, "--out", out_dir, "--images", dequant_images, "--seed", seed, *data_opt)
    )
    sections.append(
        "<h2>Dequantization</h2>\n"
        + "".join(
            _figure(f, out_dir, f"{label}: distribution of v = x + u over real digits.")
            for f, label in zip(figs, labels, strict=True)
        )
    )

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = fit_toy(probs, seed)
    for w in caught:
        if notice:
            notice(str(w.message))
    figs = plot_concepts(fit, out_dir)
    commands.append(_command("concepts", "--out", out_dir, "--probs", *[f"{p:g}" for p in probs], "--seed", seed))
    sections.append(
        "<h2>Dequantization on a toy distribution</h2>\n"
        + "<p>A smooth density on uniformly dequantized values pays "
        + f"{fit.uniform_smooth_bits - fit.entropy_bits:.3f} bits over the entropy; "
        + f"with learned (variational) dequantization it pays {fit.variational_bits - fit.entropy_bits:.3f}.</p>\n"
        + "".join(_figure(f, out_dir, f.stem.replace("_", " ")) for f in figs)
    )

    cfgs = "".join(
        f"<h3>{html.escape(label)} <code>{html.escape(r)}</code></h3>\n<pre>"
        f"{html.escape(json.dumps(c.to_dict(), indent=2))}</pre>\n"
        for label, r, c in zip(labels, run_dirs, configs, strict=True)
    )
    sections.append("<h2>Run configs</h2>\n" + cfgs)
    report_cmd = _command(
        "report",
        *run_dirs,
        "--out",
        out_dir,
        "--n",
        samples,
        "--pairs",
        pairs,
        "--steps",
        steps,
        "--images",
        dequant_images,
        "--probs",
        *[f"{p:g}" for p in probs],
        "--seed",
        seed,
        *data_opt,
    )
    sections.append(
        "<h2>Commands</h2>\n<p>This report:</p>\n<pre>"
        + html.escape(report_cmd)
        + "</pre>\n<p>Each figure on its own:</p>\n<pre>"
        + html.escape("\n".join(commands))
        + "</pre>"
    )

    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>flowmnist report</title>\n<style>{CSS}</style>\n<script>{CHECK_SCRIPT}</script>\n</head>\n<body>\n"
        "<h1>flowmnist report</h1>\n<p>Runs: "
        + ", ".join(
            f"{html.escape(lb)} (<code>{html.escape(r)}</code>)" for lb, r in zip(labels, run_dirs, strict=True)
        )
        + "</p>\n"
        + "\n".join(sections)
        + "\n</body>\n</html>\n"
    )
    index = out_dir / "index.html"
    atomic_write_bytes(index, page.encode())
    return index
