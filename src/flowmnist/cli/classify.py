"""`flowmnist classify`: a class-conditional model as a Bayes classifier, per image: the predicted digit,
its posterior p(y | x) = p(x | y) p(y) / p(x), every class's posterior and the marginal bpd."""

from __future__ import annotations

import argparse
import json

from ..config import FlowmnistError
from .common import (
    add_scoring_args,
    add_split,
    add_temperature,
    csv_text,
    emit,
    nonneg_int,
    positive_int,
    runs,
    score_format,
    score_input,
)


def cmd_classify(a: argparse.Namespace) -> int:
    from ..evaluate import class_scores, image_class_log_probs
    from ..ood import rounded
    from ..runs import load_model

    fmt = score_format(a)
    (run,) = runs(a)
    model, cfg = load_model(run, a.device)
    if not model.conditional:
        raise FlowmnistError(f"{run}: an unconditional model has no p(y | x); classify needs one trained --conditional")
    images, labels, source = own_samples(a, model) if a.own_samples else score_input(a, cfg)
    lp = image_class_log_probs(model, images, a.importance_samples)
    truth = [y if isinstance(y, int) else -1 for y in labels]  # PNG files and unlabelled sets carry no label
    import torch

    s = class_scores(lp, model.prior.log_py, torch.tensor(truth).clamp(min=0), model.dims)
    post = s.log_posterior.exp()
    rows = [
        {
            "index": i,
            "label": label,
            "predicted": int(s.predicted[i]),
            "posterior": rounded(post[i, s.predicted[i]]),
            "bpd": rounded(s.bpd[i]),
            **{f"p{c}": rounded(post[i, c]) for c in range(post.shape[1])},
        }
        for i, label in enumerate(labels)
    ]
    if fmt == "json":
        doc = {"run": str(run), **source, "importance_samples": a.importance_samples}
        if ("split" in source or "own_samples" in source) and rows and min(truth) >= 0:
            doc["accuracy"] = round(float((s.predicted == torch.tensor(truth)).double().mean()), 6)
        text = json.dumps(doc | {"rows": rows}, indent=1) + "\n"
    else:
        text = csv_text(rows) if rows else ""
    emit(a, text)
    return 0


def own_samples(a: argparse.Namespace, model):
    """The model's own samples, --own-samples N of each digit at --temperature (seed --seed), labelled with
    the digit asked for: is a sample of digit d classified as d?"""
    from ..evaluate import own_samples as draw

    for given, option in ((a.split, "--split"), (a.max_images, "--max-images")):
        if given:
            raise FlowmnistError(f"{option} applies to --data-dir and --png, not to --own-samples")
    images, digits = draw(model, a.own_samples, a.temperature, a.seed)
    source = {"own_samples": a.own_samples, "temperature": a.temperature, "seed": a.seed}
    return images, digits.tolist(), source


def add_classify_command(sub) -> None:
    c = sub.add_parser("classify", help="per-image digit, posterior p(y | x) and bpd from a class-conditional model")
    add_scoring_args(c)
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--data-dir", metavar="DIR", help="classify a split of this data directory")
    src.add_argument(
        "--png", nargs="+", metavar="FILE_OR_DIR", help="classify PNGs of the model's size (a directory: its *.png)"
    )
    src.add_argument(
        "--own-samples", type=positive_int, metavar="N", help="classify N of the model's samples of each digit"
    )
    add_split(c, help="split of --data-dir (default val)")
    add_temperature(c)
    c.add_argument("--seed", type=nonneg_int, default=0, help="the samples' seed (--own-samples; default 0)")
    c.add_argument("--out", metavar="FILE", help="write the rows to FILE.csv or FILE.json (default: CSV on stdout)")
    c.add_argument(
        "--json", action="store_true", help="JSON instead of CSV on stdout (with the accuracy of a split or samples)"
    )
    c.set_defaults(func=cmd_classify)
