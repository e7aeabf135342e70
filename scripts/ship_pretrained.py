"""Put trained runs into the package as shipped pretrained runs, and rewrite the SHA-256 manifest.

    python scripts/ship_pretrained.py RUN_DIR --name multi-vardeq      # after `flowmnist evaluate RUN_DIR`
    python scripts/ship_pretrained.py --digits ../shared/data/mnist     # the real validation digits for figures
    python scripts/ship_pretrained.py --digits DIR --dataset fashion-mnist   # the same for Fashion-MNIST models
    python scripts/ship_pretrained.py --test-results R.json --name NAME # add R's test split to NAME's results
    python scripts/ship_pretrained.py --tight-results R.json --name NAME # R (K > 8) as NAME's tighter bound
    python scripts/ship_pretrained.py                                   # only rewrite the manifest

A shipped run holds config.json, metrics.csv, results.json and model.pt (the final float32 weights and
the config; no optimizer state). See flowmnist.runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flowmnist.data import FILES, load_dir, write_idx
from flowmnist.runs import PRETRAINED_ROOT, digits_folder, export_run, write_json, write_manifest

N_DIGITS = 600  # load_dir's split keeps 1/6 of them (100) as the figures' "val" digits


def ship_digits(data_dir: str, dataset: str = "mnist", split_seed: int = 42) -> None:
    """The first N_DIGITS images of the validation split (the shipped models' own: split seed 42) as
    an MNIST IDX directory. All are validation images, so none was trained on."""
    data = load_dir(data_dir, split_seed)
    images, labels = data.split("val")
    out = PRETRAINED_ROOT / digits_folder(dataset)
    out.mkdir(parents=True, exist_ok=True)
    write_idx(out / (FILES["train-images"][0] + ".gz"), images[:N_DIGITS, 0].numpy())
    write_idx(out / (FILES["train-labels"][0] + ".gz"), labels[:N_DIGITS].numpy())


def _results_of_shipped(results_json: str, name: str) -> tuple[dict, Path, dict]:
    """(the evaluation, the shipped run's results.json path, its results), refused where they are of
    another model."""
    new = json.loads(open(results_json).read())
    path = PRETRAINED_ROOT / name / "results.json"
    old = json.loads(path.read_text())
    if (new["model"], new.get("conditional"), new["params"]) != (old["model"], old.get("conditional"), old["params"]):
        raise SystemExit(f"{results_json}: results of another model than the shipped {name}")
    return new, path, old


def add_split_results(results_json: str, name: str) -> None:
    """Merge the per-split entries of ``results_json`` (`flowmnist evaluate --pretrained NAME --split test
    --json`) into the shipped run's results.json: its other splits and fields stay as they are."""
    new, path, old = _results_of_shipped(results_json, name)
    if new["importance_samples"] != old["importance_samples"]:
        k, shipped = new["importance_samples"], old["importance_samples"]
        raise SystemExit(f"{results_json}: K = {k}, the shipped results have K = {shipped}")
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(old.get(key), dict) and key != "training":
            old[key].update(value)
    write_json(path, old)


def add_tight_results(results_json: str, name: str) -> None:
    """Record an evaluation with more importance samples (`flowmnist evaluate --pretrained NAME --split test
    --importance-samples 64 --every 5 --json`) as the shipped run's ``bpd_tight``: per split its bpd, K,
    image count and stride, beside the K = 8 figures it does not replace."""
    new, path, old = _results_of_shipped(results_json, name)
    k = new["importance_samples"]
    if k <= old["importance_samples"]:
        raise SystemExit(f"{results_json}: K = {k}, not more than the shipped results' {old['importance_samples']}")
    tight = old.setdefault("bpd_tight", {})
    for split, bpd in new["bpd"].items():
        tight[split] = {"bpd": bpd, "importance_samples": k, "images": new["images"][split], "every": new["every"]}
    write_json(path, old)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", nargs="?", help="a trained and evaluated run directory")
    p.add_argument("--name", help="the shipped name (default: the run's model name)")
    p.add_argument("--digits", metavar="DATA_DIR", help="ship real validation images from this IDX directory")
    p.add_argument("--dataset", default="mnist", help="what --digits holds (default mnist)")
    p.add_argument("--test-results", metavar="JSON", help="merge this evaluation's splits into --name's results")
    p.add_argument("--tight-results", metavar="JSON", help="record this evaluation (K > 8) as --name's bpd_tight")
    a = p.parse_args()
    if a.run_dir:
        from flowmnist.runs import run_config

        name = a.name or run_config(a.run_dir).model
        for path in export_run(a.run_dir, PRETRAINED_ROOT / name):
            print(path)
    if a.digits:
        ship_digits(a.digits, a.dataset)
    if a.test_results:
        add_split_results(a.test_results, a.name)
    if a.tight_results:
        add_tight_results(a.tight_results, a.name)
    manifest = write_manifest()
    print(f"manifest: {len(manifest['files'])} files, runs {', '.join(manifest['runs']) or 'none'}")


if __name__ == "__main__":
    main()
