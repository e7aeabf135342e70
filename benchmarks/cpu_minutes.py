"""What learns fastest per CPU-minute: candidate architectures and protocols trained for the same CPU
budget on full MNIST, their validation bpd against CPU-minutes in one figure.

    python benchmarks/cpu_minutes.py --data-dir ../shared/data/mnist --cpu-minutes 24 [--out runs/cpu_minutes]
    python benchmarks/cpu_minutes.py --figure-only          # redraw from docs/results/cpu_minutes/

A one-core candidate is `flowmnist train --minutes B` pinned to one core with one thread; they run in
one queue per core (--cores), the queues side by side. A two-core candidate (torchrun with 2 ranks x 1
thread, or one process with 2 threads) runs alone for B / 2 minutes of wall clock. So every candidate
gets B CPU-minutes, and CPU-minutes on the figure are wall-clock minutes times the cores used. Every
run: the package's default recipe (batch 16, Adam 2e-3, warm-up, cosine to 0 over its budget, bfloat16
training steps where native, compiled nets), seed 0, validation every --val-minutes on the first
--val-images validation images (single-sample bound, the run's fixed noise; the EMA's weights where
kept), and at the end. Validation time is part of the budget. A run directory per candidate under
--out; an interrupted benchmark resumes its runs. Each run's metrics.csv is copied to
docs/results/cpu_minutes/ and summarised in docs/results/cpu_minutes.json; the figure is
docs/images/cpu_minutes.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from flowmnist.runtime import cpu_kind

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results" / "cpu_minutes"

# name -> (cores, train options)
CANDIDATES: dict[str, tuple[int, list[str]]] = {
    "multi-vardeq": (1, ["--model", "multi-vardeq"]),
    "multi-vardeq + EMA 0.999": (1, ["--model", "multi-vardeq", "--ema", "0.999"]),
    "multi-vardeq-wide": (1, ["--model", "multi-vardeq-wide"]),
    "multi-vardeq-mixlog": (1, ["--model", "multi-vardeq-mixlog"]),
    "multi-vardeq-glow": (1, ["--model", "multi-vardeq-glow"]),
    "flowpp": (1, ["--model", "flowpp"]),
    "multi-vardeq-glow-wide": (1, ["--model", "multi-vardeq-glow-wide"]),
    "multi-vardeq on 2 ranks x 1 thread": (2, ["--model", "multi-vardeq"]),
    "multi-vardeq on 1 process x 2 threads": (2, ["--model", "multi-vardeq"]),
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name).strip("_")


def command(name: str, run: Path, a: argparse.Namespace, core: int | None) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of one candidate (resuming its run if it has a checkpoint)."""
    cores, opts = CANDIDATES[name]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    minutes = a.cpu_minutes / cores
    if (run / "last.pt").exists():
        args = ["train", "--out", str(run), "--resume"]
    else:
        args = ["train", *opts, "--data-dir", a.data_dir, "--minutes", f"{minutes:g}", "--out", str(run)]
        args += ["--val-minutes", f"{a.val_minutes / cores:g}", "--val-images", str(a.val_images), "--epochs", "1000"]
    if "ranks" in name:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        launch += ["-m", "flowmnist"]
        return ["taskset", "-c", "0,1", *launch, *args], env
    if cores == 2:
        return ["taskset", "-c", "0,1", sys.executable, "-m", "flowmnist", *args], {**env, "OMP_NUM_THREADS": "2"}
    return ["taskset", "-c", str(core), sys.executable, "-m", "flowmnist", *args], env  # one core, one thread


def run_one(name: str, a: argparse.Namespace, core: int | None) -> None:
    run = Path(a.out) / slug(name)
    if (run / "done").exists():
        return
    cmd, env = command(name, run, a, core)
    print("$", " ".join(cmd), flush=True)
    with open(Path(a.out) / f"{slug(name)}.log", "a") as log:
        code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"{name}: training failed (exit {code}); see {log.name}")
    (run / "done").touch()
    collect(name, run)


def run_all(names: list[str], a: argparse.Namespace) -> None:
    """The one-core candidates in one queue per core of --cores (round robin), the queues side by side;
    then each two-core candidate alone."""
    from concurrent.futures import ThreadPoolExecutor

    cores = [int(c) for c in a.cores.split(",")]
    single = [n for n in names if CANDIDATES[n][0] == 1]
    queues = {c: single[i :: len(cores)] for i, c in enumerate(cores)}
    with ThreadPoolExecutor(len(cores)) as pool:
        for f in [pool.submit(lambda c=c: [run_one(n, a, c) for n in queues[c]]) for c in cores]:
            f.result()
    for name in names:
        if CANDIDATES[name][0] == 2:
            run_one(name, a, None)


def collect(name: str, run: Path) -> None:
    """The run's metrics.csv into docs/results/cpu_minutes/, with its CPU-minutes per row."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(run / "metrics.csv", RESULTS / f"{slug(name)}.csv")


def read_curve(name: str) -> tuple[list[float], list[float], int]:
    """(CPU-minutes, val bpd) of the candidate's validations, and its optimizer steps."""
    import csv

    path = RESULTS / f"{slug(name)}.csv"
    cores = CANDIDATES[name][0]
    rows = list(csv.DictReader(path.open()))
    vals = [r for r in rows if r["split"] == "val"]
    return [float(r["seconds"]) * cores / 60 for r in vals], [float(r["bpd"]) for r in vals], int(rows[-1]["step"])


def summarise(names: list[str], machine: str) -> dict:
    out = {"machine": machine, "candidates": {}}
    for name in names:
        if not (RESULTS / f"{slug(name)}.csv").exists():
            continue
        minutes, bpd, steps = read_curve(name)
        out["candidates"][name] = {
            "cores": CANDIDATES[name][0],
            "steps": steps,
            "cpu_minutes": round(minutes[-1], 2),
            "final_val_bpd": round(bpd[-1], 5),
            "curve": [[round(m, 2), round(b, 5)] for m, b in zip(minutes, bpd, strict=True)],
        }
    return out


def figure(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, c in summary["candidates"].items():
        x, y = zip(*c["curve"], strict=True)
        ax.plot(x, y, marker="o", ms=3, label=f"{name} ({c['final_val_bpd']:.3f})", ls="--" if c["cores"] == 2 else "-")
    finals = [c["final_val_bpd"] for c in summary["candidates"].values()]
    if finals:
        ax.set_ylim(min(finals) - 0.02, min(finals) + 0.25)
    ax.set_xlabel("CPU-minutes (wall-clock minutes x cores)")
    ax.set_ylabel("val bpd (single sample)")
    ax.set_title(f"Validation bpd per CPU-minute, full MNIST\n{summary['machine']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="the official MNIST IDX files (60,000 training images)")
    p.add_argument("--cpu-minutes", type=float, default=24.0, help="each candidate's budget (default 24)")
    p.add_argument("--val-minutes", type=float, default=6.0, help="CPU-minutes between validations (default 6)")
    p.add_argument("--val-images", type=int, default=2000, help="validation images per validation (default 2000)")
    p.add_argument("--out", default="runs/cpu_minutes", help="run directories (default runs/cpu_minutes)")
    p.add_argument("--only", help="comma-separated candidate names (default all)")
    p.add_argument("--cores", default="0,1", help="cores for the one-core candidates, one queue each (default 0,1)")
    p.add_argument("--figure-only", action="store_true", help="redraw the figure and summary from docs/results")
    a = p.parse_args()
    names = a.only.split(",") if a.only else list(CANDIDATES)
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        sys.exit(f"--only: unknown candidate {unknown[0]!r}; choose from {', '.join(CANDIDATES)}")
    summary_path = RESULTS.parent / "cpu_minutes.json"
    machine = str(cpu_kind())
    if a.figure_only and summary_path.exists():  # the curves were measured on the machine recorded with them
        machine = json.loads(summary_path.read_text())["machine"]
    elif not a.figure_only:
        if not a.data_dir:
            sys.exit("--data-dir is required to train")
        Path(a.out).mkdir(parents=True, exist_ok=True)
        run_all(names, a)
    summary = summarise(list(CANDIDATES), machine)
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    figure(summary, ROOT / "docs" / "images" / "cpu_minutes.png")
    for name, c in summary["candidates"].items():
        print(f"{name:40s} {c['steps']:6d} steps  {c['cpu_minutes']:6.1f} CPU-min  val {c['final_val_bpd']:.4f}")


if __name__ == "__main__":
    main()
