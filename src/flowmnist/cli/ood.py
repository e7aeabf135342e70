"""`flowmnist score | ood`: per-image out-of-distribution scores, and their AUROC / AUPR / FPR95
between two data sets."""

from __future__ import annotations

import argparse
import json

from ..config import Config
from .common import (
    add_scoring_args,
    add_split,
    csv_text,
    data_dir,
    emit,
    figure_data,
    out_file,
    positive_int,
    runs,
    score_format,
    score_input,
)

# --- score --------------------------------------------------------------------------------------------


def cmd_score(a: argparse.Namespace) -> int:
    from ..ood import rounded, score_images
    from ..runs import load_model

    fmt = score_format(a)
    (run,) = runs(a)
    model, cfg = load_model(run, a.device)
    images, labels, source = score_input(a, cfg)
    s = score_images(model, images, a.importance_samples)
    rows = [
        {"index": i, "label": label, **{key: rounded(s[key][i]) for key in ("bpd", "complexity_bpd", "corrected")}}
        for i, label in enumerate(labels)
    ]
    if fmt == "json":
        doc = {"run": str(run), **source, "importance_samples": a.importance_samples, "rows": rows}
        text = json.dumps(doc, indent=1) + "\n"
    else:
        text = csv_text(rows)
    emit(a, text)
    return 0


def add_score_command(sub) -> None:
    sc = sub.add_parser("score", help="per-image OOD scores: bpd, PNG complexity, complexity-corrected bpd")
    add_scoring_args(sc)
    src = sc.add_mutually_exclusive_group(required=True)
    src.add_argument("--data-dir", metavar="DIR", help="score a split of this data directory")
    src.add_argument(
        "--png", nargs="+", metavar="FILE_OR_DIR", help="score PNG files of the model's size (a directory: its *.png)"
    )
    add_split(sc, help="split of --data-dir (default val)")
    sc.add_argument("--out", metavar="FILE", help="write the rows to FILE.csv or FILE.json (default: CSV on stdout)")
    sc.add_argument("--json", action="store_true", help="JSON instead of CSV on stdout")
    sc.set_defaults(func=cmd_score)


# --- ood ----------------------------------------------------------------------------------------------


def _ood_table(r: dict) -> str:
    """The metrics as a Markdown table, then the two sets and the typicality reference as a list."""
    from ..ood import scores_table

    lines = [scores_table(r["scores"]), ""]
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
    from ..data import load_data

    own = figure_data(a) if not a.in_data else None  # a shipped model's own: the images shipped with it
    own = own.get(cfg.dataset) if isinstance(own, dict) else own
    sets = {}
    for key, arg, split in (("in", a.in_data, a.split), ("ood", a.ood_data, a.ood_split or a.split)):
        data = load_data(cfg, data_dir(arg) if arg else own)
        sets[key] = (str(data.root), split, data.split(split)[0][: a.max_images])
    return sets


def cmd_ood(a: argparse.Namespace) -> int:
    from ..ood import compare
    from ..runs import load_model

    out = out_file(a.out) if a.out else None
    (run,) = runs(a)
    model, cfg = load_model(run, a.device)
    sets = _ood_sets(a, cfg)
    r, ins, outs = compare(model, sets["in"][2], sets["ood"][2], a.importance_samples, a.batch_sizes)
    for key, (root, split, _) in sets.items():
        r[key].update(data_dir=root, split=split)
    r["split"] = a.split
    if out is not None:
        from ..figures import plot_ood_histograms

        r["figure"] = str(plot_ood_histograms(ins, outs, out))
    print(json.dumps(r) if a.json else _ood_table(r))
    return 0


def add_ood_command(sub) -> None:
    from ..ood import BATCH_SIZES

    o = sub.add_parser("ood", help="AUROC, AUPR, FPR95 of each OOD score between two data directories")
    add_scoring_args(o)
    o.add_argument(
        "--in-data",
        metavar="DIR",
        help="data directory of in-distribution images (default: the run's own data; for a shipped model, the "
        "images shipped with it)",
    )
    o.add_argument("--ood-data", required=True, metavar="DIR", help="data directory of out-of-distribution images")
    add_split(o, default="val", help="split of both sets (default val)")
    add_split(o, "--ood-split", help="split of the OOD set, where it differs from --split")
    o.add_argument(
        "--batch-sizes",
        type=positive_int,
        nargs="+",
        default=list(BATCH_SIZES),
        metavar="M",
        help=f"typicality test batch sizes M (default {' '.join(map(str, BATCH_SIZES))})",
    )
    o.add_argument("--out", metavar="FIG", help="write the score histograms to this PNG file (default: no figure)")
    o.add_argument("--json", action="store_true", help="print one JSON object")
    o.set_defaults(func=cmd_ood)
