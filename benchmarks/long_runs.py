"""Long runs against CPU-minutes: the validation curves of training runs that span many sessions, read
from their metrics.csv (the ``cpu_seconds`` column: the training processes' CPU time over every resume).

    python benchmarks/long_runs.py ~/runs/long/multi-vardeq-glow-wide-long ~/runs/long/multi-vardeq-glow-deep
    python benchmarks/long_runs.py --figure-only          # redraw from docs/results/long_runs/

Each run's metrics.csv is copied to docs/results/long_runs/<run>.csv and summarised (steps, CPU-minutes,
val bpd at each validation, restarts) in docs/results/long_runs.json; the figure is
docs/images/long_runs.png. ``--at M`` also prints each run's val bpd at M CPU-minutes (linear between
validations), the comparison at equal CPU time.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from flowmnist.runtime import cpu_kind

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results" / "long_runs"
SUMMARY = ROOT / "docs" / "results" / "long_runs.json"
FIGURE = ROOT / "docs" / "images" / "long_runs.png"


def read_curve(path: Path) -> dict:
    """Steps, CPU-minutes and val bpd of a metrics.csv's validation rows."""
    rows = list(csv.DictReader(path.open()))
    vals = [r for r in rows if r["split"] == "val"]
    cpu = [float(r.get("cpu_seconds") or "nan") / 60 for r in vals]
    if any(c != c for c in cpu):
        raise SystemExit(f"{path}: validation rows without cpu_seconds; this needs a run that records CPU time")
    return {
        "steps": int(rows[-1]["step"]),
        "cpu_minutes": round(float(rows[-1]["cpu_seconds"]) / 60, 1),
        "curve": [[int(r["step"]), round(c, 2), round(float(r["bpd"]), 5)] for r, c in zip(vals, cpu, strict=True)],
    }


def at(curve: list[list[float]], minutes: float) -> float:
    """Val bpd at ``minutes`` CPU-minutes, linear between validations (nan outside the curve)."""
    m = [c[1] for c in curve]
    return float(np.interp(minutes, m, [c[2] for c in curve], left=np.nan, right=np.nan))


def figure(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, run in summary["runs"].items():
        _, x, y = zip(*run["curve"], strict=True)
        ax.plot(x, y, marker="o", ms=3, label=f"{name} ({y[-1]:.4f} at {x[-1]:.0f})")
    ax.set_xlabel("CPU-minutes (the training process's CPU time, over every resume)")
    ax.set_ylabel("val bpd (single sample, first 2,000 val)")
    ax.set_title(f"Long runs, full MNIST, one core each\n{summary['machine']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", help="run directories (their metrics.csv is copied to docs/results/long_runs)")
    p.add_argument("--figure-only", action="store_true", help="redraw from docs/results/long_runs")
    p.add_argument("--at", type=float, action="append", default=[], help="print val bpd at these CPU-minutes")
    a = p.parse_args()
    if not a.runs and not a.figure_only:
        sys.exit("give run directories, or --figure-only")
    machine = str(cpu_kind())
    if a.figure_only and SUMMARY.exists():  # measured on the machine recorded with the curves
        machine = json.loads(SUMMARY.read_text())["machine"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    for run in map(Path, a.runs):
        if not (run / "metrics.csv").is_file():
            sys.exit(f"{run}: no metrics.csv (not a run directory)")
        shutil.copy(run / "metrics.csv", RESULTS / f"{run.name}.csv")
    summary = {"machine": machine, "runs": {f.stem: read_curve(f) for f in sorted(RESULTS.glob("*.csv"))}}
    SUMMARY.write_text(json.dumps(summary, indent=1) + "\n")
    figure(summary, FIGURE)
    for name, run in summary["runs"].items():
        line = f"{name:32s} {run['steps']:6d} steps {run['cpu_minutes']:6.1f} CPU-min  val {run['curve'][-1][2]:.4f}"
        print(line + "".join(f"  @{m:g}: {at(run['curve'], m):.4f}" for m in a.at))


if __name__ == "__main__":
    main()
