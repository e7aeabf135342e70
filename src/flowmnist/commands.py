"""Command lines that code writes for a user to run (the report's "commands" section), as argv lists.

Options are named by their parser ``dest`` and spelled by argparse's own rule, ``--`` + dest with
``_`` as ``-``, so the spelling lives in one place, the parser; tests/test_cli.py parses every command
line written here with the real parser and checks each option comes back with its value.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from .runs import shipped_name

Value = str | int | float | bool | Path | list | tuple | None


def argv(command: str, *positional: str | Path, **options: Value) -> list[str]:
    """``flowmnist COMMAND POSITIONAL... --option value ...``: an option that is None or False is left
    out, True is the bare flag, a list or tuple is the flag then its items (left out when empty)."""
    words = ["flowmnist", command, *map(str, positional)]
    for dest, value in options.items():
        flag = "--" + dest.replace("_", "-")
        if value is None or value is False or (isinstance(value, list | tuple) and not value):
            continue
        if value is True:
            words.append(flag)
        elif isinstance(value, list | tuple):
            words += [flag, *map(_word, value)]
        else:
            words += [flag, _word(value)]
    return words


def _word(v: Value) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def run_options(run_dirs: list[Path]) -> tuple[list[str], dict[str, list[str]]]:
    """(positionals, options) naming ``run_dirs``: their paths, then ``--pretrained NAME ...`` for the
    shipped runs (a path inside the installed package means nothing on another machine)."""
    paths = [str(r) for r in run_dirs if shipped_name(r) is None]
    shipped = [name for name in map(shipped_name, run_dirs) if name is not None]
    return paths, ({"pretrained": shipped} if shipped else {})


def runs_argv(command: str, run_dirs: list[Path], **options: Value) -> list[str]:
    """``argv`` of a command that takes run directories (RUN_DIR... and/or --pretrained NAME...)."""
    paths, named = run_options(run_dirs)
    return argv(command, *paths, **named, **options)


def shell_line(words: list[str]) -> str:
    """One argv as a line to paste into a POSIX shell."""
    return shlex.join(words)
