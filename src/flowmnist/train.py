"""The training loop: Adam, per-epoch LR decay, gradient clipping, a wall-clock budget, metrics log,
atomic latest/best checkpoints, exact resume, skipped non-finite steps, and clean stops on signals.

Run directory:
    config.json   the Config            metrics.csv  step,epoch,split,bpd,lr,seconds
    last.pt       resumable state       best.pt      best model by val bpd
"""

from __future__ import annotations

import csv
import io
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .config import Config, FlowmnistError, atomic_write_bytes, load_checkpoint, save_checkpoint, write_json
from .data import load_mnist
from .evaluate import dataset_bpd
from .models import build_model

METRIC_FIELDS = ("step", "epoch", "split", "bpd", "lr", "seconds")
RUN_FILES = ("config.json", "last.pt", "best.pt", "metrics.csv")


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The batch order of an epoch, a function of (seed, epoch) only, so a resumed run that
    restarts mid-epoch sees exactly the batches it would have seen."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checks it at each step boundary, checkpoints and exits."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [
            {
                "step": int(r["step"]),
                "epoch": int(r["epoch"]),
                "split": r["split"],
                "bpd": float(r["bpd"]),
                "lr": float(r["lr"]),
                "seconds": float(r["seconds"]),
            }
            for r in csv.DictReader(f)
        ]


def check_run_dir(run_dir: Path, resume: bool, force: bool) -> None:
    """Refuse to mix runs: an occupied directory needs --resume (continue) or --force (replace)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise FlowmnistError(f"{run_dir}: exists and is not a directory")
    if resume:
        if not (run_dir / "last.pt").is_file():
            raise FlowmnistError(f"{run_dir}: nothing to resume (no last.pt)")
        return
    if any((run_dir / f).exists() for f in RUN_FILES) and not force:
        raise FlowmnistError(f"{run_dir}: already holds a run; pass --resume to continue it or --force to replace it")


def train(
    cfg: Config,
    run_dir: str | Path,
    resume: bool = False,
    force: bool = False,
    device: str = "cpu",
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train ``cfg.model``; returns a summary dict. Every state change that matters is on disk in
    ``run_dir`` before this returns or raises."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir, resume, force)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise FlowmnistError(f"{run_dir}: cannot write to the run directory ({e.strerror or e})") from e
    for stale in run_dir.glob(".*.tmp"):  # left by a write that a kill -9 interrupted
        stale.unlink()

    data = load_mnist(cfg.data_dir, cfg.split_seed, cfg.val_fraction)
    train_x, val_x = data.images["train"], data.images["val"]
    if len(train_x) < cfg.batch_size:
        raise FlowmnistError(f"--batch-size {cfg.batch_size} is larger than the {len(train_x)} training images")

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.alpha, fast=cfg.fast).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=cfg.lr_decay)
    st = {"step": 0, "epoch": 0, "batch": 0, "seconds": 0.0, "best_val": math.inf, "nonfinite": 0}
    rows: list[dict[str, Any]] = []
    running: list[float] = []  # train bpd of the steps since the last train row

    if resume:
        ckpt = load_checkpoint(run_dir / "last.pt")
        old = Config.from_dict(ckpt["config"])
        for key in ("model", "alpha", "seed", "batch_size", "split_seed", "val_fraction"):
            if getattr(old, key) != getattr(cfg, key):
                raise FlowmnistError(
                    f"{run_dir}: cannot resume with {key}={getattr(cfg, key)!r}; the run has {getattr(old, key)!r}"
                )
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        st.update(ckpt["state"])
        torch.set_rng_state(ckpt["rng"])
        running = st.pop("running", [])  # the train-bpd average in progress when the run stopped
        # Drop log rows written after this checkpoint: they will be produced again.
        rows = read_metrics(run_dir)[: ckpt["metrics_rows"]]
    _write_metrics(run_dir / "metrics.csv", rows)
    write_json(run_dir / "config.json", cfg.to_dict())

    n = len(train_x)
    nb = n // cfg.batch_size  # drop the last partial batch: constant shapes, unbiased over epochs
    budget = cfg.minutes * 60 if cfg.minutes is not None else math.inf
    t0 = time.perf_counter() - st["seconds"]
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=cfg.epochs * nb, initial=st["epoch"] * nb + st["batch"], disable=not show, unit="step")

    def log(split: str, bpd: float) -> None:
        rows.append(
            {
                "step": st["step"],
                "epoch": st["epoch"],
                "split": split,
                "bpd": bpd,
                "lr": opt.param_groups[0]["lr"],
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )

    def checkpoint() -> None:
        st["seconds"] = time.perf_counter() - t0
        _write_metrics(run_dir / "metrics.csv", rows)  # rows first: the checkpoint says how many count
        save_checkpoint(
            run_dir / "last.pt",
            {
                "config": cfg.to_dict(),
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "state": {**st, "running": list(running)},
                "rng": torch.get_rng_state(),
                "metrics_rows": len(rows),
            },
        )

    def validate() -> float:
        model.eval()
        # fork_rng: validation noise is fixed and does not shift the training stream (exact resume).
        val = dataset_bpd(model, val_x, k=1, seed=cfg.seed + 12345)[1]
        model.train()
        log("val", val)
        if val < st["best_val"]:
            st["best_val"] = val
            save_checkpoint(
                run_dir / "best.pt",
                {
                    "config": cfg.to_dict(),
                    "model": model.state_dict(),
                    "state": {"step": st["step"], "epoch": st["epoch"], "val_bpd": val},
                },
            )
        return val

    stopped_by = "epochs"
    consecutive_bad = 0
    model.train()
    with _StopFlag() as stop:
        while st["epoch"] < cfg.epochs:
            order = epoch_order(n, cfg.seed, st["epoch"])
            while st["batch"] < nb:
                if stop.signum is not None:
                    stopped_by = signal.Signals(stop.signum).name
                    break
                if time.perf_counter() - t0 >= budget:
                    stopped_by = "minutes"
                    break
                idx = order[st["batch"] * cfg.batch_size : (st["batch"] + 1) * cfg.batch_size]
                x = train_x[idx].to(device, non_blocking=True)
                loss = model.bpd(x).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                st["batch"] += 1
                if not (torch.isfinite(loss) and torch.isfinite(gnorm)):
                    # Skip the update, keep the weights; give up after too many in a row.
                    st["nonfinite"] += 1
                    consecutive_bad += 1
                    log("nonfinite", loss.item())
                    if consecutive_bad >= cfg.max_nonfinite:
                        bar.close()
                        _write_metrics(run_dir / "metrics.csv", rows)
                        raise FlowmnistError(
                            f"training stopped: {consecutive_bad} non-finite losses or gradients in a row at "
                            f"step {st['step']}; the last good checkpoint is kept in {run_dir / 'last.pt'}"
                        )
                    continue
                consecutive_bad = 0
                opt.step()
                st["step"] += 1
                running.append(loss.item())
                bar.update(1)
                if st["step"] % cfg.log_every == 0:
                    log("train", sum(running) / len(running))
                    bar.set_postfix(bpd=f"{rows[-1]['bpd']:.3f}")
                    running = []
                if cfg.val_every and st["step"] % cfg.val_every == 0:
                    validate()
                    checkpoint()
            else:  # epoch completed
                if running:
                    log("train", sum(running) / len(running))
                    running = []
                if not cfg.val_every:
                    validate()
                sched.step()
                st["epoch"] += 1
                st["batch"] = 0
                checkpoint()
                continue
            break
        if running and not stopped_by.startswith("SIG"):  # a signal stop carries it in the checkpoint
            log("train", sum(running) / len(running))
            running = []
        # A budget stop ends with a validation (the run's final val bpd); a signal stops at once.
        if stopped_by == "minutes" and (not rows or rows[-1]["split"] != "val" or rows[-1]["step"] != st["step"]):
            validate()
        checkpoint()
    bar.close()
    vals = [r["bpd"] for r in rows if r["split"] == "val"]
    return {
        "run_dir": str(run_dir),
        "model": cfg.model,
        "step": st["step"],
        "epoch": st["epoch"],
        "stopped_by": stopped_by,
        "val_bpd": vals[-1] if vals else math.nan,
        "best_val_bpd": st["best_val"],
        "seconds": round(time.perf_counter() - t0, 1),
        "nonfinite_steps": st["nonfinite"],
    }
