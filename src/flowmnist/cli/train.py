"""`flowmnist train`: its parser and its handler. Every option whose name is a ``Config`` field sets
that field; the rest (``PROCESS_OPTIONS``) say how and where to run."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ..config import CLASS_LATENTS, PRECISIONS, SCHEDULES, Config, prepare_output
from ..data import DATASETS
from ..models import ARCHITECTURES
from .common import (
    add_device,
    data_dir,
    ema_decay,
    is_main_process,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    unit_float,
)

DEFAULTS = Config()
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(Config))
PROCESS_OPTIONS = ("out", "resume", "force", "device", "tf32")  # train's options that are not Config fields


def train_config(a: argparse.Namespace) -> Config:
    """The run's config: last.pt's when resuming (else the defaults), then every Config field the
    command line gives."""
    if a.resume and (Path(a.out) / "last.pt").is_file():
        from ..runs import load_checkpoint

        cfg = Config.from_dict(load_checkpoint(Path(a.out) / "last.pt")["config"])
    else:
        cfg = Config(data_dir=data_dir(a.data_dir))
    given = {k: v for k, v in vars(a).items() if k in CONFIG_FIELDS and v is not None}
    if "data_dir" in given:
        given["data_dir"] = data_dir(a.data_dir)
    # --dataset without a data directory: what to download; with one: what it holds, for titles
    return dataclasses.replace(cfg, **given)


def cmd_train(a: argparse.Namespace) -> int:
    from ..train import train

    cfg = train_config(a)
    run_dir = Path(a.out)
    prepare_output(run_dir, "--out", is_dir=True, make=False)  # training makes and probes it itself
    summary = train(cfg, run_dir, resume=a.resume, force=a.force, device=a.device, tf32=a.tf32)
    if is_main_process():
        print(json.dumps(summary))
    if summary["stopped_by"] in ("SIGINT", "SIGTERM"):
        if is_main_process():
            print(
                f"flowmnist train: stopped by {summary['stopped_by']}; checkpoint saved, continue with --resume",
                file=sys.stderr,
            )
        return 130 if summary["stopped_by"] == "SIGINT" else 143
    return 0


def add_train_command(sub) -> None:
    t = sub.add_parser(
        "train",
        help="train a model into a run directory",
        description="Train a model into a run directory. Runs unchanged under torchrun, one process per GPU "
        "(e.g. torchrun --standalone --nproc_per_node=4 -m flowmnist train ...): NCCL on GPUs, gloo on CPUs.",
    )
    t.add_argument("--model", choices=tuple(ARCHITECTURES), help=f"model architecture (default {DEFAULTS.model})")
    t.add_argument(
        "--data-dir",
        help="a data directory: IDX files under any prefix, NumPy .npy/.npz arrays, or PNGs (a folder per class, "
        "or flat: unlabelled), 8-bit grayscale (default: $FLOWMNIST_DATA, else download)",
    )
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
        type=nonneg_float,
        metavar="LAMBDA",
        help="with --conditional: train on log p(x | y) + LAMBDA log p(y | x) (Nalisnick et al. 2019; default 0)",
    )
    t.add_argument(
        "--class-latent",
        choices=CLASS_LATENTS,
        help="with --conditional: the class means on the whole latent (all, default) or the final latent (top)",
    )
    t.add_argument(
        "--class-spread",
        type=nonneg_float,
        metavar="S",
        help="with --conditional: initial class means drawn from N(0, S^2) (default 0: all at 0)",
    )
    t.add_argument(
        "--class-fixed",
        action="store_true",
        default=None,
        help="with --class-spread: keep the class means and unit scales fixed (FlowGMM's Gaussian mixture)",
    )
    t.set_defaults(func=cmd_train)


def _add_recipe_options(t: argparse.ArgumentParser) -> None:
    """train's recipe: epochs or a budget, batch, LR and its schedule, logging, EMA."""
    t.add_argument("--epochs", type=positive_int, help=f"epochs (default {DEFAULTS.epochs})")
    t.add_argument("--minutes", type=positive_float, help="wall-clock budget; stops at a step boundary")
    t.add_argument(
        "--steps", type=positive_int, help="optimizer-step budget, the cosine over it (equal runs on a busy CPU)"
    )
    t.add_argument(
        "--batch-size",
        type=positive_int,
        help=f"global batch size (default {DEFAULTS.batch_size}); under torchrun it is split evenly across the "
        "ranks and must be divisible by their number",
    )
    t.add_argument("--lr", type=positive_float, help=f"Adam learning rate (default {DEFAULTS.lr})")
    t.add_argument("--seed", type=nonneg_int, help=f"random seed (default {DEFAULTS.seed})")
    t.add_argument("--log-every", type=positive_int, help=f"steps per train-bpd log row (default {DEFAULTS.log_every})")
    t.add_argument("--val-every", type=nonneg_int, help="steps between validations (default 0: each epoch)")
    t.add_argument(
        "--val-minutes", type=nonneg_float, help="minutes of training between validations (default 0: by --val-every)"
    )
    t.add_argument(
        "--schedule",
        choices=SCHEDULES,
        help=f"LR schedule (default {DEFAULTS.schedule}: over the --minutes budget if given, else the epochs)",
    )
    t.add_argument("--warmup-steps", type=nonneg_int, help=f"linear LR warm-up steps (default {DEFAULTS.warmup_steps})")
    t.add_argument(
        "--lr-min", type=unit_float, help=f"final cosine LR as a fraction of --lr (default {DEFAULTS.lr_min})"
    )
    t.add_argument("--ema", type=ema_decay, help=f"weight EMA decay, 0 for none (default {DEFAULTS.ema})")
    t.add_argument(
        "--init-from",
        metavar="NAME|RUN_DIR",
        help="start from a shipped model's or a run's weights (same architecture; a conditional run takes an "
        "unconditional model's flows, its prior fresh) with a fresh optimizer and schedule",
    )
    t.add_argument(
        "--checkpoint-minutes",
        type=positive_float,
        help=f"write last.pt at least this often (default {DEFAULTS.checkpoint_minutes:g})",
    )
    t.add_argument(
        "--val-images", type=nonneg_int, help="validate on the first N validation images (default 0: all of them)"
    )


def _add_process_options(t: argparse.ArgumentParser) -> None:
    """train's run and process options: resume, device, precision, compilation."""
    t.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    t.add_argument("--force", action="store_true", help="replace a run already in --out")
    add_device(
        t,
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
    t.add_argument(
        "--no-compile",
        dest="compile",
        action="store_const",
        const=False,
        help="run the nets eagerly (no torch.compile warm-up)",
    )
    t.add_argument(
        "--plain",
        "--reference",
        dest="fast",
        action="store_const",
        const=False,
        help="train with the plain code path (fast=False), not the fast modules (--reference: the same)",
    )
