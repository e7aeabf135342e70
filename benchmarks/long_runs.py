"""Long runs against CPU-minutes: the validation curves of training runs that span many sessions, read
from their metrics.csv (the ``cpu_seconds`` column: the training processes' CPU time over every resume).

    python benchmarks/long_runs.py ~/runs/long/multi-vardeq-glow-wide-long ~/runs/long/multi-vardeq-glow-deep
    python benchmarks/long_runs.py --figure-only          # redraw from docs/results/long_runs/

Each run's metrics.csv is copied to docs/results/long_runs/<run>.csv and summarised (steps, CPU-minutes,
val bpd at each validation, restarts) in docs/results/long_runs.json; the figure is
docs/images/long_runs.png, each restart (a ``--resume`` after the process was stopped; read from the run's
last.pt) marked on its curve. ``--at M`` also prints each run's val bpd at M CPU-minutes (linear between
validations), the comparison at equal CPU time; ``--references`` draws the test figures the long run
aims at (the original report's best and published flows; they are test bpd at several importance samples,
the curves single-sample val bpd, which sits above a model's test bpd at K = 8).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from flowmnist.runs import training_summary
from flowmnist.runtime import cpu_kind

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results" / "long_runs"
SUMMARY = ROOT / "docs" / "results" / "long_runs.json"
FIGURE = ROOT / "docs" / "images" / "long_runs.png"
# Test bpd on 8-bit MNIST: the original report's best (multi-vardeq, 200 GPU epochs) and published flows
REFERENCES = {
    "original report, multi-vardeq": 1.020,
    "RealNVP (Dinh et al. 2017)": 1.06,
    "Glow (Kingma & Dhariwal 2018)": 1.05,
    "FFJORD (Grathwohl et al. 2019)": 0.99,
    "Residual Flows (Chen et al. 2019)": 0.97,
}


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


def figure(summary: dict, path: Path, references: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, run in summary["runs"].items():
        _, x, y = zip(*run["curve"], strict=True)
        line = ax.plot(x, y, marker="o", ms=3, label=f"{name} ({y[-1]:.4f} at {x[-1]:.0f})")[0]
        marks = [m for m in run.get("restarts_cpu_minutes", []) if x[0] <= m <= x[-1]]
        ax.plot(marks, np.interp(marks, x, y), "|", ms=12, color=line.get_color())
    if references:
        for i, (what, bpd) in enumerate(REFERENCES.items()):
            ax.axhline(bpd, ls="--", lw=0.8, color=f"C{i + 3}", label=f"{what}: test {bpd:.3f}")
    ax.set_xlabel("CPU-minutes (the training process's CPU time, over every resume)")
    ax.set_ylabel("val bpd (single sample, first 2,000 val)")
    ax.set_title(f"Long runs, full MNIST, one core each (|: a restart)\n{summary['machine']}", fontsize=9)
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
    p.add_argument("--references", action="store_true", help="draw the report's and published flows' test bpd")
    a = p.parse_args()
    if not a.runs and not a.figure_only:
        sys.exit("give run directories, or --figure-only")
    old = json.loads(SUMMARY.read_text()) if SUMMARY.exists() else {"runs": {}}
    machine = old["machine"] if a.figure_only and "machine" in old else str(cpu_kind())
    RESULTS.mkdir(parents=True, exist_ok=True)
    restarts = {name: run.get("restarts_cpu_minutes", []) for name, run in old["runs"].items()}
    for run in map(Path, a.runs):
        if not (run / "metrics.csv").is_file():
            sys.exit(f"{run}: no metrics.csv (not a run directory)")
        shutil.copy(run / "metrics.csv", RESULTS / f"{run.name}.csv")
        done = training_summary(run) or {}
        restarts[run.name] = [round(r["cpu_seconds"] / 60, 2) for r in done.get("restarts", [])]
    runs = {
        f.stem: read_curve(f) | {"restarts_cpu_minutes": restarts.get(f.stem, [])}
        for f in sorted(RESULTS.glob("*.csv"))
    }
    summary = {"machine": machine, "runs": runs}
    SUMMARY.write_text(json.dumps(summary, indent=1) + "\n")
    figure(summary, FIGURE, a.references)
    for name, run in summary["runs"].items():
        line = f"{name:32s} {run['steps']:6d} steps {run['cpu_minutes']:6.1f} CPU-min  val {run['curve'][-1][2]:.4f}"
        print(line + "".join(f"  @{m:g}: {at(run['curve'], m):.4f}" for m in a.at))


if __name__ == "__main__":
    main()
