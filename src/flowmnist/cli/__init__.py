"""The command line, one module per group of commands (each command's parser beside its handler):

  train            train a model into a run directory                             (cli/train.py)
  evaluate         bpd per split, inference and sampling time; writes results.json (cli/results.py)
  table            Markdown results table of runs' results.json                   (cli/results.py)
  sample           one run's generated digits as a PNG grid                       (cli/results.py)
  curves           train and val bpd vs step of one or more runs                  (cli/figures.py)
  compare-samples  several runs' sample grids side by side                        (cli/figures.py)
  interpolate      latent walks between real digits                               (cli/figures.py)
  dequant          distribution of the dequantized values v = x + u               (cli/figures.py)
  concepts         dequantization explained on a toy 1-D distribution             (cli/figures.py)
  report           every figure and the results table in one static index.html    (cli/figures.py)
  score            per-image OOD scores of a data split or PNG files              (cli/ood.py)
  ood              AUROC, AUPR, FPR95 of each OOD score between two data sets     (cli/ood.py)
  classify         per-image digit, posterior and bpd (a conditional model)       (cli/classify.py)
  bench            the plain code path vs the fast ones: speed and memory         (cli/bench.py)
  compress         lossless compression of digits by bits-back coding             (cli/codec.py)
  decompress       the original IDX bytes of a compressed file, exactly           (cli/codec.py)

Options several commands share are declared once, in cli/common.py. User errors print one line and
exit 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import sys

from ..config import FlowmnistError
from .bench import add_bench_command
from .classify import add_classify_command
from .codec import add_codec_commands
from .common import Parser, is_main_process
from .figures import (
    add_concepts_command,
    add_curves_command,
    add_dequant_command,
    add_interpolate_command,
    add_report_command,
    add_samples_command,
)
from .ood import add_ood_command, add_score_command
from .results import add_evaluate_command, add_sample_command, add_table_command
from .train import add_train_command

COMMANDS = (
    add_train_command,
    add_evaluate_command,
    add_table_command,
    add_sample_command,
    add_curves_command,
    add_samples_command,
    add_interpolate_command,
    add_dequant_command,
    add_concepts_command,
    add_report_command,
    add_score_command,
    add_ood_command,
    add_classify_command,
    add_bench_command,
    add_codec_commands,
)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="flowmnist", description="Normalizing flows on MNIST: train, evaluate, sample.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in COMMANDS:
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..runtime import tune_allocator

    if args.command != "train":  # see its docstring for why not in training
        tune_allocator()
    try:
        return args.func(args)
    except FlowmnistError as e:
        if args.debug:
            raise
        if is_main_process():  # every rank of a launch has the same error (dist.Dist.agreed)
            print(f"flowmnist {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flowmnist {args.command}: interrupted", file=sys.stderr)
        return 130


__all__ = ["build_parser", "main"]
