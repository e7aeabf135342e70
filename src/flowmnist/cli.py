"""Command line: `flowmnist train | evaluate | table | sample | bench`. Each subcommand is a small function
calling the modules; user errors print one line and exit 2 (`--debug` shows the traceback)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from .config import PRECISIONS, SCHEDULES, Config, FlowmnistError, prepare_output
from .data import DATASETS
from .models import ARCHITECTURES, MODELS

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


def _float_in(s: str, lo: float, hi: float, closed_hi: bool) -> float:
    want = f"a number in [{lo:g}, {hi:g}{']' if closed_hi else ')'}"
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {want}, got {s!r}") from None
    if not (lo <= v <= hi if closed_hi else lo <= v < hi):
        raise argparse.ArgumentTypeError(f"must be {want}, got {s!r}")
    return v


def _unit_float(s: str) -> float:
    return _float_in(s, 0.0, 1.0, closed_hi=True)


def _ema_decay(s: str) -> float:
    return _float_in(s, 0.0, 1.0, closed_hi=False)


def _nonneg_float(s: str) -> float:
    return _float_in(s, 0.0, math.inf, closed_hi=False)


def _digit(s: str) -> int | str:
    """--digit: 0..9, or all."""
    if s == "all" or s in tuple("0123456789"):
        return s if s == "all" else int(s)
    raise argparse.ArgumentTypeError(f"must be a digit 0-9 or all, got {s!r}")


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


def _is_main_process() -> bool:
    """Rank 0 of a torchrun launch (or a plain process): the one that prints results and errors."""
    return os.environ.get("RANK", "0") == "0"


def _out_file(arg: str, option: str = "--out") -> Path:
    """An output file path: not an existing directory, its folder made (``config.prepare_output``)."""
    return prepare_output(arg, option)


def _add_run_args(p: argparse.ArgumentParser, many: bool) -> None:
    """RUN_DIR (or several) and/or --pretrained NAME: a shipped model instead of a run directory."""
    from .runs import pretrained_names

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


def _runs(a: argparse.Namespace) -> list[Path]:
    """The run directories of a command: its RUN_DIRs, then its verified shipped runs."""
    from .runs import pretrained_runs

    given = [Path(r) for r in getattr(a, "run_dirs", None) or ([a.run_dir] if getattr(a, "run_dir", None) else [])]
    shipped = a.pretrained if isinstance(a.pretrained, list) else [a.pretrained] if a.pretrained else []
    if not given and not shipped:
        raise FlowmnistError("give a RUN_DIR or --pretrained NAME")
    if shipped and "run_dir" in vars(a) and given:
        raise FlowmnistError("give either RUN_DIR or --pretrained NAME, not both")
    return given + pretrained_runs(shipped)


def _figure_data(a: argparse.Namespace) -> str | dict[str, str] | None:
    """Real digits for figures: --data-dir or $FLOWMNIST_DATA; else, when every run is a shipped one,
    the validation images shipped with them, {dataset: directory} (no download); else None (each
    run's own data)."""
    from .runs import shipped_digits_by_dataset

    if getattr(a, "data_dir", None) or os.environ.get("FLOWMNIST_DATA"):
        return _data_dir(getattr(a, "data_dir", None))
    if a.pretrained and not getattr(a, "run_dirs", None):
        return shipped_digits_by_dataset()
    return None


def cmd_train(a: argparse.Namespace) -> int:
    from .train import train

    given = {k: v for k, v in vars(a).items() if v is not None}
    run_dir = Path(a.out)
    if a.resume and (run_dir / "last.pt").is_file():
        from .runs import load_checkpoint

        cfg = Config.from_dict(load_checkpoint(run_dir / "last.pt")["config"])
    else:
        cfg = Config(data_dir=_data_dir(a.data_dir))
    for key in (
        *("model", "seed", "epochs", "minutes", "batch_size", "lr", "log_every", "val_every"),
        *("precision", "schedule", "warmup_steps", "ema", "lr_min", "conditional", "hybrid_weight"),
        *("init_from", "checkpoint_minutes", "val_images", "val_minutes"),
    ):
        if key in given:
            setattr(cfg, key, given[key])
    if "data_dir" in given:
        cfg.data_dir = _data_dir(a.data_dir)
    if "dataset" in given:  # without a data directory: what to download; with one: what it holds, for titles
        cfg.dataset = a.dataset
    if a.plain:
        cfg.fast = False
    if a.no_compile:
        cfg.compile = False
    prepare_output(run_dir, "--out", is_dir=True, make=False)  # training makes and probes it itself
    summary = train(cfg, run_dir, resume=a.resume, force=a.force, device=a.device, tf32=a.tf32)
    if _is_main_process():
        print(json.dumps(summary))
    if summary["stopped_by"] in ("SIGINT", "SIGTERM"):
        if _is_main_process():
            print(
                f"flowmnist train: stopped by {summary['stopped_by']}; checkpoint saved, continue with --resume",
                file=sys.stderr,
            )
        return 130 if summary["stopped_by"] == "SIGINT" else 143
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .evaluate import classification_table, evaluate_run, results_table

    (run,) = _runs(a)
    r = evaluate_run(
        run,
        a.split,
        a.importance_samples,
        _data_dir(a.data_dir),
        a.max_images,
        a.device,
        timing_reps=a.timing_reps,
        compile=a.compile,
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
    from .evaluate import model_name
    from .figures import plot_confusion

    name = model_name(r)
    return [
        plot_confusion(m, Path(run) / f"confusion_{split}.png", f"{name}, {split}")
        for split, m in r["confusion"].items()
    ]


def cmd_table(a: argparse.Namespace) -> int:
    from .evaluate import results_table

    results = []
    for run in _runs(a):
        path = run / "results.json"
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

    from .plots import save_grid
    from .runs import load_model, run_title

    out = _out_file(a.out)
    (run,) = _runs(a)
    model, cfg = load_model(run, a.device)
    if a.digit is not None and not cfg.conditional:
        raise FlowmnistError(f"--digit: {run} is an unconditional {cfg.model} run; train one with --conditional")
    if a.digit == "all":
        from .figures import save_digit_grid

        save_digit_grid(model, out, run_title(cfg.model, True, cfg.dataset), a.n or 10, a.temperature, a.seed)
        print(out)
        return 0
    g = torch.Generator(device=a.device).manual_seed(a.seed)
    images = model.sample(a.n or 64, temperature=a.temperature, generator=g, y=a.digit)
    what = "samples" if a.digit is None else f"samples of digit {a.digit}"
    save_grid(images, out, title=f"{run_title(cfg.model, cfg.conditional, cfg.dataset)} {what} (T={a.temperature:g})")
    print(out)
    return 0


# --- Figures and report (flowmnist.figures, flowmnist.toy, flowmnist.report) ---------------------


def _out_dir(arg: str) -> Path:
    return prepare_output(arg, "--out", is_dir=True)


def _print_paths(paths) -> int:
    for p in paths:
        print(p)
    return 0


def cmd_curves(a: argparse.Namespace) -> int:
    from .figures import plot_curves

    return _print_paths(plot_curves(_runs(a), _out_dir(a.out)))


def cmd_samples(a: argparse.Namespace) -> int:
    from .figures import plot_samples

    return _print_paths(plot_samples(_runs(a), _out_dir(a.out), a.n, a.seed, a.temperature, a.device))


def cmd_interpolate(a: argparse.Namespace) -> int:
    from .figures import plot_interpolations

    out = _out_dir(a.out)
    paths = plot_interpolations(_runs(a), out, a.pairs, a.steps, a.seed, a.spherical, _figure_data(a), a.device)
    return _print_paths(paths)


def cmd_dequant(a: argparse.Namespace) -> int:
    from .figures import plot_dequant

    out = _out_dir(a.out)
    return _print_paths(plot_dequant(_runs(a), out, a.images, a.draws, a.seed, _figure_data(a), a.device))


def cmd_concepts(a: argparse.Namespace) -> int:
    from .toy import fit_toy_noting, plot_concepts

    out = _out_dir(a.out)
    fit, notes = fit_toy_noting(a.probs, a.seed)
    for note in notes:
        print(f"flowmnist: note: {note}", file=sys.stderr)
    return _print_paths(plot_concepts(fit, out))


def cmd_report(a: argparse.Namespace) -> int:
    from .report import build_report

    out = _out_dir(a.out)
    data_dir = _figure_data(a)
    index = build_report(
        _runs(a),
        out,
        seed=a.seed,
        pairs=a.pairs,
        steps=a.steps,
        samples=a.n,
        dequant_images=a.images,
        probs=a.probs,
        data_dir=data_dir,
        device=a.device,
        ood=(_data_dir(a.ood_data), a.ood_images) if a.ood_data else None,
        notice=lambda msg: print(f"flowmnist report: note: {msg}", file=sys.stderr),
    )
    print(index)
    return 0


def _add_figure_commands(sub) -> None:
    from .toy import DEFAULT_PROBS

    def runs(p, help_text: str):
        _add_run_args(p, many=True)
        p.add_argument("--out", required=True, help=help_text)

    def data_and_device(p):
        p.add_argument(
            "--data-dir",
            help="real digits from this directory (default: $FLOWMNIST_DATA, else each run's own data; for "
            "shipped models, the validation digits shipped with them)",
        )
        p.add_argument("--device", default="cpu")

    c = sub.add_parser("curves", help="train and val bpd vs step of one or more runs (train_log.png, val_log.png)")
    runs(c, "output folder")
    c.set_defaults(func=cmd_curves)

    s = sub.add_parser("samples", help="the runs' sample grids side by side (samples.png)")
    runs(s, "output folder")
    s.add_argument("--n", type=_positive_int, default=36, help="samples per run (default 36)")
    s.add_argument("--seed", type=_nonneg_int, default=0)
    s.add_argument("--temperature", type=_positive_float, default=1.0, help="prior std scale (1.0: exact)")
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=cmd_samples)

    i = sub.add_parser("interpolate", help="latent walks between real digits (interpolation.png)")
    runs(i, "output folder")
    i.add_argument("--pairs", type=_positive_int, default=2, help="digit pairs per run (default 2)")
    i.add_argument("--steps", type=_positive_int, default=8, help="images per walk, ends included (default 8)")
    i.add_argument("--seed", type=_nonneg_int, default=0, help="chooses the digit pairs (encoding is deterministic)")
    i.add_argument("--spherical", action="store_true", help="spherical (slerp) instead of linear interpolation")
    data_and_device(i)
    i.set_defaults(func=cmd_interpolate)

    d = sub.add_parser("dequant", help="distribution of the dequantized values v = x + u (dequant_MODEL.png)")
    runs(d, "output folder")
    d.add_argument("--images", type=_positive_int, default=64, help="real digits to dequantize (default 64)")
    d.add_argument("--draws", type=_positive_int, default=1, help="noise draws per digit (default 1)")
    d.add_argument("--seed", type=_nonneg_int, default=0)
    data_and_device(d)
    d.set_defaults(func=cmd_dequant)

    k = sub.add_parser("concepts", help="dequantization explained on a toy 1-D distribution (concept_*.png)")
    k.add_argument("--out", required=True, help="output folder")
    k.add_argument(
        "--probs", type=float, nargs="+", default=list(DEFAULT_PROBS), help="probabilities of 0, 1, ... (normalised)"
    )
    k.add_argument("--seed", type=_nonneg_int, default=0)
    k.set_defaults(func=cmd_concepts)

    r = sub.add_parser("report", help="all figures and the results table in one static index.html")
    runs(r, "output folder (index.html and the PNGs)")
    r.add_argument("--n", type=_positive_int, default=36, help="samples per run (default 36)")
    r.add_argument("--pairs", type=_positive_int, default=2)
    r.add_argument("--steps", type=_positive_int, default=8)
    r.add_argument("--images", type=_positive_int, default=64, help="digits for the dequantization figure")
    r.add_argument("--probs", type=float, nargs="+", default=list(DEFAULT_PROBS), help="toy distribution")
    r.add_argument("--seed", type=_nonneg_int, default=0)
    r.add_argument(
        "--ood-data", metavar="DIR", help="add an OOD section: each run's held-out images against this IDX directory's"
    )
    r.add_argument(
        "--ood-images", type=_positive_int, default=500, metavar="N", help="images of each set in the OOD section"
    )
    data_and_device(r)
    r.set_defaults(func=cmd_report)


# --- OOD scores (flowmnist.ood) ----------------------------------------------------------------


def _rounded(v) -> float | None:
    """A score for CSV/JSON: 6 decimals, None (empty in CSV, null in JSON) when not finite."""
    v = float(v)
    return round(v, 6) if math.isfinite(v) else None


def _score_format(a: argparse.Namespace) -> str:
    """The output format, "csv" or "json": --out's extension when given, else --json's choice."""
    if a.out is None:
        return "json" if a.json else "csv"
    suffix = Path(a.out).suffix.lower()
    if suffix not in (".csv", ".json"):
        raise FlowmnistError(f"--out {a.out}: must end in .csv or .json")
    if a.json and suffix == ".csv":
        raise FlowmnistError(f"--json and --out {a.out} disagree; use a .json file name")
    _out_file(a.out)
    return suffix[1:]


def _score_input(a: argparse.Namespace, cfg: Config):
    """(uint8 images, labels, source description) for `score`: a data directory's split, or PNGs."""
    from .data import load_mnist
    from .ood import png_files, read_png_digits

    if a.png:
        if a.split:
            raise FlowmnistError("--split applies to --data-dir, not to --png")
        files = png_files(a.png)[: a.max_images]
        return read_png_digits(files), [str(f) for f in files], {"png": [str(p) for p in a.png]}
    split = a.split or "val"
    data = load_mnist(_data_dir(a.data_dir), cfg.split_seed, cfg.val_fraction)
    images, labels = data.split(split)
    return images[: a.max_images], labels[: a.max_images].tolist(), {"data_dir": str(data.root), "split": split}


def _csv_text(rows: list[dict]) -> str:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def cmd_score(a: argparse.Namespace) -> int:
    from .config import atomic_write_bytes
    from .ood import score_images
    from .runs import load_model

    fmt = _score_format(a)
    (run,) = _runs(a)
    model, cfg = load_model(run, a.device)
    images, labels, source = _score_input(a, cfg)
    s = score_images(model, images, a.importance_samples)
    rows = [
        {"index": i, "label": label, **{key: _rounded(s[key][i]) for key in ("bpd", "complexity_bpd", "corrected")}}
        for i, label in enumerate(labels)
    ]
    if fmt == "json":
        doc = {"run": str(run), **source, "importance_samples": a.importance_samples, "rows": rows}
        text = json.dumps(doc, indent=1) + "\n"
    else:
        text = _csv_text(rows)
    if a.out:
        atomic_write_bytes(_out_file(a.out), text.encode())
        print(a.out)
    else:
        sys.stdout.write(text)
    return 0


def _ood_table(r: dict) -> str:
    """The metrics as a Markdown table, then the two sets and the typicality reference as a list."""
    lines = ["| score | AUROC | AUPR | FPR95 |", "|---|---:|---:|---:|"]
    for name, m in r["scores"].items():
        lines.append(f"| {name} | {m['auroc']:.4f} | {m['aupr']:.4f} | {m['fpr95']:.4f} |")
    lines.append("")
    for key, title in (("in", "in-distribution"), ("ood", "OOD")):
        d = r[key]
        mean = "–" if d["mean_bpd"] is None else f"{d['mean_bpd']:.4f}"
        lines.append(f"- {title}: {d['data_dir']} ({d['split']}), {d['images']} images, mean bpd {mean}")
    t = r["typicality"]
    lines.append(
        f"- typicality: Ĥ = {t['entropy_bpd']:.4f} bpd from {t['reference_images']} in-distribution images; "
        f"the other {t['scored_in_images']} are scored"
    )
    return "\n".join(lines)


def _ood_sets(a: argparse.Namespace, cfg: Config) -> dict:
    """{"in" | "ood": (data directory, split, uint8 images)}, both read before any scoring starts. The
    in-distribution set defaults to the run's own data."""
    from .data import load_mnist

    own = _figure_data(a) if not a.in_data else None  # a shipped model's own: the images shipped with it
    own = own.get(cfg.dataset) if isinstance(own, dict) else own
    sets = {}
    for key, arg, split in (("in", a.in_data, a.split), ("ood", a.ood_data, a.ood_split or a.split)):
        root = _data_dir(arg) if arg else own or cfg.data_dir
        data = load_mnist(root, cfg.split_seed, cfg.val_fraction, cfg.dataset if key == "in" else "mnist")
        sets[key] = (str(data.root), split, data.split(split)[0][: a.max_images])
    return sets


def cmd_ood(a: argparse.Namespace) -> int:
    from .ood import compare
    from .runs import load_model

    out = _out_file(a.out) if a.out else None
    (run,) = _runs(a)
    model, cfg = load_model(run, a.device)
    sets = _ood_sets(a, cfg)
    r, ins, outs = compare(model, sets["in"][2], sets["ood"][2], a.importance_samples, a.batch_sizes)
    for key, (root, split, _) in sets.items():
        r[key].update(data_dir=root, split=split)
    r["split"] = a.split
    if out is not None:
        from .figures import plot_ood_histograms

        r["figure"] = str(plot_ood_histograms(ins, outs, out))
    print(json.dumps(r) if a.json else _ood_table(r))
    return 0


def _add_ood_commands(sub) -> None:
    from .ood import BATCH_SIZES

    def common(p):
        _add_run_args(p, many=False)
        p.add_argument("--max-images", type=_positive_int, metavar="N", help="only the first N images (of each set)")
        p.add_argument(
            "--importance-samples",
            type=_positive_int,
            default=8,
            metavar="K",
            help="dequantization samples K of the importance-weighted bpd (default 8)",
        )
        p.add_argument("--device", default="cpu")

    sc = sub.add_parser("score", help="per-image OOD scores: bpd, PNG complexity, complexity-corrected bpd")
    common(sc)
    src = sc.add_mutually_exclusive_group(required=True)
    src.add_argument("--data-dir", metavar="DIR", help="score a split of this IDX directory")
    src.add_argument("--png", nargs="+", metavar="FILE_OR_DIR", help="score 28x28 PNG files (a directory: its *.png)")
    sc.add_argument("--split", choices=("train", "val", "test"), help="split of --data-dir (default val)")
    sc.add_argument("--out", metavar="FILE", help="write the rows to FILE.csv or FILE.json (default: CSV on stdout)")
    sc.add_argument("--json", action="store_true", help="JSON instead of CSV on stdout")
    sc.set_defaults(func=cmd_score)

    o = sub.add_parser("ood", help="AUROC, AUPR, FPR95 of each OOD score between two IDX directories")
    common(o)
    o.add_argument(
        "--in-data",
        metavar="DIR",
        help="IDX directory of in-distribution images (default: the run's own data; for a shipped model, the "
        "images shipped with it)",
    )
    o.add_argument("--ood-data", required=True, metavar="DIR", help="IDX directory of out-of-distribution images")
    o.add_argument("--split", choices=("train", "val", "test"), default="val", help="split of both sets (default val)")
    o.add_argument(
        "--ood-split", choices=("train", "val", "test"), help="split of the OOD set, where it differs from --split"
    )
    o.add_argument(
        "--batch-sizes",
        type=_positive_int,
        nargs="+",
        default=list(BATCH_SIZES),
        metavar="M",
        help=f"typicality test batch sizes M (default {' '.join(map(str, BATCH_SIZES))})",
    )
    o.add_argument("--out", metavar="FIG", help="write the score histograms to this PNG file (default: no figure)")
    o.add_argument("--json", action="store_true", help="print one JSON object")
    o.set_defaults(func=cmd_ood)


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


def _add_train_command(sub) -> None:
    t = sub.add_parser(
        "train",
        help="train a model into a run directory",
        description="Train a model into a run directory. Runs unchanged under torchrun, one process per GPU "
        "(e.g. torchrun --standalone --nproc_per_node=4 -m flowmnist train ...): NCCL on GPUs, gloo on CPUs.",
    )
    t.add_argument("--model", choices=tuple(ARCHITECTURES), help=f"model architecture (default {DEFAULTS.model})")
    t.add_argument("--data-dir", help="directory with MNIST IDX files (default: $FLOWMNIST_DATA, else download)")
    t.add_argument(
        "--dataset",
        choices=tuple(DATASETS),
        help=f"the dataset (default {DEFAULTS.dataset}): downloaded and cached without --data-dir/$FLOWMNIST_DATA, "
        "else the name of what the directory holds (titles, report)",
    )
    t.add_argument("--out", default="runs/run", help="run directory (default runs/run)")
    _add_recipe_options(t)
    _add_process_options(t)
    t.add_argument(
        "--conditional",
        action="store_true",
        default=None,
        help="class-conditional model p(x | y) of the labelled digits (a Gaussian prior per digit): sample --digit, "
        "and evaluate reports its accuracy as a classifier",
    )
    t.add_argument(
        "--hybrid-weight",
        type=_nonneg_float,
        metavar="LAMBDA",
        help="with --conditional: train on log p(x | y) + LAMBDA log p(y | x) (Nalisnick et al. 2019; default 0)",
    )
    t.set_defaults(func=cmd_train)


def _add_recipe_options(t: argparse.ArgumentParser) -> None:
    """train's recipe: epochs or a budget, batch, LR and its schedule, logging, EMA."""
    t.add_argument("--epochs", type=_positive_int, help=f"epochs (default {DEFAULTS.epochs})")
    t.add_argument("--minutes", type=_positive_float, help="wall-clock budget; stops at a step boundary")
    t.add_argument(
        "--batch-size",
        type=_positive_int,
        help=f"global batch size (default {DEFAULTS.batch_size}); under torchrun it is split evenly across the "
        "ranks and must be divisible by their number",
    )
    t.add_argument("--lr", type=_positive_float, help=f"Adam learning rate (default {DEFAULTS.lr})")
    t.add_argument("--seed", type=_nonneg_int, help=f"random seed (default {DEFAULTS.seed})")
    t.add_argument(
        "--log-every", type=_positive_int, help=f"steps per train-bpd log row (default {DEFAULTS.log_every})"
    )
    t.add_argument("--val-every", type=_nonneg_int, help="steps between validations (default 0: each epoch)")
    t.add_argument(
        "--val-minutes", type=_nonneg_float, help="minutes of training between validations (default 0: by --val-every)"
    )
    t.add_argument(
        "--schedule",
        choices=SCHEDULES,
        help=f"LR schedule (default {DEFAULTS.schedule}: over the --minutes budget if given, else the epochs)",
    )
    t.add_argument(
        "--warmup-steps", type=_nonneg_int, help=f"linear LR warm-up steps (default {DEFAULTS.warmup_steps})"
    )
    t.add_argument(
        "--lr-min", type=_unit_float, help=f"final cosine LR as a fraction of --lr (default {DEFAULTS.lr_min})"
    )
    t.add_argument("--ema", type=_ema_decay, help=f"weight EMA decay, 0 for none (default {DEFAULTS.ema})")
    t.add_argument(
        "--init-from",
        metavar="NAME|RUN_DIR",
        help="start from a shipped model's or a run's weights (same architecture) with a fresh optimizer and schedule",
    )
    t.add_argument(
        "--checkpoint-minutes",
        type=_positive_float,
        help=f"write last.pt at least this often (default {DEFAULTS.checkpoint_minutes:g})",
    )
    t.add_argument(
        "--val-images", type=_nonneg_int, help="validate on the first N validation images (default 0: all of them)"
    )


def _add_process_options(t: argparse.ArgumentParser) -> None:
    """train's run and process options: resume, device, precision, compilation."""
    t.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    t.add_argument("--force", action="store_true", help="replace a run already in --out")
    t.add_argument(
        "--device",
        default="auto",
        help="auto (default: the GPU of this local rank if CUDA is present, else the CPU), cpu, cuda or cuda:N",
    )
    t.add_argument("--tf32", action="store_true", help="TF32 math for float32 convolutions and matmuls (GPU)")
    t.add_argument(
        "--precision",
        choices=PRECISIONS,
        help=f"precision of the coupling nets in training steps (default {DEFAULTS.precision}: bfloat16 where the "
        "device has it natively); weights, log-determinants, validation and evaluation stay float32",
    )
    t.add_argument("--no-compile", action="store_true", help="run the nets eagerly (no torch.compile warm-up)")
    t.add_argument(
        "--plain",
        "--reference",
        dest="plain",
        action="store_true",
        help="train with the plain code path (fast=False), not the fast modules (--reference: the same)",
    )


def _add_evaluate_command(sub) -> None:
    e = sub.add_parser("evaluate", help="bpd per split, inference and sampling time; writes results.json")
    _add_run_args(e, many=False)
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
    e.add_argument("--timing-reps", type=_positive_int, default=5, help="timed repetitions (median; default 5)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--device", default="cpu")
    e.add_argument(
        "--compile", action="store_true", help="torch.compile the coupling nets: faster on many images, ~1 min warm-up"
    )
    e.set_defaults(func=cmd_evaluate)


def _add_sample_commands(sub) -> None:
    """table and sample: one run's (or several runs') results and samples."""
    tb = sub.add_parser("table", help="Markdown results table from runs' results.json")
    _add_run_args(tb, many=True)
    tb.set_defaults(func=cmd_table)

    s = sub.add_parser("sample", help="a grid of generated digits as a PNG")
    _add_run_args(s, many=False)
    s.add_argument(
        "--n", type=_positive_int, help="number of samples (default 64); with --digit all, per digit (default 10)"
    )
    s.add_argument(
        "--digit",
        type=_digit,
        metavar="D",
        help="a conditional run's digit 0-9, or all: a 10-row grid, row d the samples of digit d",
    )
    s.add_argument("--out", default="samples.png", help="PNG file to write")
    s.add_argument("--seed", type=_nonneg_int, default=0)
    s.add_argument("--temperature", type=_positive_float, default=1.0, help="prior std scale (1.0: exact)")
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=cmd_sample)


def _add_bench_command(sub) -> None:
    bn = sub.add_parser("bench", help="plain vs fast code paths: train img/s, eval and sampling ms, peak memory")
    bn.add_argument("--models", help=f"comma-separated subset of {','.join(MODELS)} (default all)")
    bn.add_argument("--steps", type=_positive_int, default=5, help="timed training steps per path (default 5)")
    bn.add_argument("--batch-size", type=_positive_int, default=128, help="training batch size (default 128)")
    bn.add_argument("--threads", type=_positive_int, help="torch intra-op threads (default: torch's choice)")
    bn.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    bn.add_argument("--json", action="store_true", help="print one JSON object")
    bn.set_defaults(func=cmd_bench)


# --- compress / decompress (flowmnist.codec) ------------------------------------------------------


def _codec_input(paths: list[str]):
    """(uint8 images (N, 28, 28), original bytes, source): one IDX file (gzipped or not), else PNG files
    or directories of them (the original is then the IDX file of their pixels, in order)."""
    import gzip
    import zlib

    import numpy as np

    from .codec import idx_bytes
    from .data import DataError, parse_idx
    from .ood import read_png_digits

    first = Path(paths[0])
    if len(paths) == 1 and first.is_file() and first.suffix.lower() != ".png":
        raw = first.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError, zlib.error) as e:
                raise DataError(f"{first}: not a valid gzip file ({e})") from e
        images = parse_idx(raw, str(first))
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise DataError(f"{first}: expected N x 28 x 28 images, header says {'x'.join(map(str, images.shape))}")
        return images, raw, "idx"
    images = read_png_digits(paths)[:, 0].numpy()
    return images, idx_bytes(np.ascontiguousarray(images)), "png"


def _codec_bar(n: int, what: str):
    from tqdm import tqdm

    return tqdm(total=n, unit="img", desc=what, disable=n < 100, file=sys.stderr, leave=False)


def cmd_compress(a: argparse.Namespace) -> int:
    from .codec import compress_images
    from .config import atomic_write_bytes
    from .runs import load_model, verify_pretrained

    if a.pretrained:
        run, name, paths = verify_pretrained(a.pretrained), f"pretrained:{a.pretrained}", a.paths
    elif len(a.paths) >= 3:
        run, name, paths = Path(a.paths[0]), f"run:{Path(a.paths[0]).resolve()}", a.paths[1:]
    else:
        raise FlowmnistError("give RUN_DIR IN... OUT, or --pretrained NAME IN... OUT")
    if len(paths) < 2:
        raise FlowmnistError("give the input (an IDX file, PNG files or a directory of them) and OUT")
    out = _out_file(paths[-1], "OUT")
    images, original, source = _codec_input(paths[:-1])
    model = load_model(run)[0]
    with _codec_bar(len(images), "compress") as bar:
        data, st = compress_images(model, images, name=name, original=original, source=source, progress=bar.update)
    atomic_write_bytes(out, data)
    print(
        f"{out}: {st.images} images, {len(data)} bytes, {st.rate_bpd:.4f} bits/dim; the model's single-sample bound "
        f"{st.bound_bpd:.4f} bits/dim (initial bits and header: {8 * len(data) - st.bound_bits:.0f} bits in all)"
    )
    return 0


def cmd_decompress(a: argparse.Namespace) -> int:
    import gzip

    from .codec import decompress_bytes, read_header
    from .config import atomic_write_bytes
    from .runs import load_model, load_pretrained

    src, out = Path(a.input), _out_file(a.output, "OUT")
    try:
        data = src.read_bytes()
    except OSError as e:
        raise FlowmnistError(f"{src}: cannot read ({e.strerror or e})") from e
    made_with = read_header(data, str(src)).model_name
    if a.pretrained or a.run:
        model = load_pretrained(a.pretrained) if a.pretrained else load_model(a.run)[0]
    elif made_with.startswith("pretrained:"):
        model = load_pretrained(made_with.removeprefix("pretrained:"))
    elif made_with.startswith("run:") and Path(made_with[4:]).exists():
        model = load_model(made_with[4:])[0]
    else:
        raise FlowmnistError(f"{src}: made with {made_with or 'an unnamed model'}; pass --run RUN_DIR or --pretrained")
    with _codec_bar(read_header(data).count, "decompress") as bar:
        original, header = decompress_bytes(data, model, name=str(src), progress=bar.update)
    atomic_write_bytes(out, gzip.compress(original, mtime=0) if out.suffix == ".gz" else original)
    what = "IDX file of the PNGs' pixels" if header.source == "png" else "IDX file"
    print(f"{out}: {header.count} images, the original {what} ({len(original)} bytes, CRC-32 checked)")
    return 0


def _add_codec_commands(sub) -> None:
    c = sub.add_parser("compress", help="lossless compression of digits by bits-back coding with a flow")
    c.add_argument(
        "paths", nargs="+", metavar="PATH", help="[RUN_DIR] IN... OUT: an IDX file (gzipped or not) or PNGs, then OUT"
    )
    c.add_argument("--pretrained", metavar="NAME", help="a shipped model instead of RUN_DIR")
    c.set_defaults(func=cmd_compress)
    d = sub.add_parser("decompress", help="restore the original IDX bytes of a compressed file exactly")
    d.add_argument("input", metavar="IN", help="a file written by `flowmnist compress`")
    d.add_argument("output", metavar="OUT", help="the IDX file to write (gzipped if it ends in .gz)")
    src = d.add_mutually_exclusive_group()
    src.add_argument("--pretrained", metavar="NAME", help="the shipped model (default: the one the file names)")
    src.add_argument("--run", metavar="RUN_DIR", help="the run directory (default: the one the file names)")
    d.set_defaults(func=cmd_decompress)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="flowmnist", description="Normalizing flows on MNIST: train, evaluate, sample.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train_command(sub)
    _add_evaluate_command(sub)
    _add_sample_commands(sub)
    _add_figure_commands(sub)
    _add_ood_commands(sub)
    _add_bench_command(sub)
    _add_codec_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .runtime import tune_allocator

    if args.command != "train":  # see its docstring for why not in training
        tune_allocator()
    try:
        return args.func(args)
    except FlowmnistError as e:
        if args.debug:
            raise
        if _is_main_process():  # every rank of a launch has the same error (dist.Dist.agreed)
            print(f"flowmnist {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flowmnist {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
