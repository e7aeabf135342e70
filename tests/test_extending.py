"""docs/extending.md stays true: every file it names exists, and every layer class has its row in the
flow contract test (or is one of the named exceptions with tests of their own)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from test_flows import LAYERS

from flowmnist import flows

REPO = Path(__file__).resolve().parents[1]
PAGE = (REPO / "docs" / "extending.md").read_text()
# Layers that bend the contract (flows.py's docstring) or are a base class: tested on their own.
EXCEPTIONS = {"Dequantization", "Split", "Coupling"}


def test_every_file_the_page_names_exists():
    named = set(re.findall(r"`((?:src|tests|scripts|docs|benchmarks)/[\w./-]+|[\w-]+\.(?:py|md|sh))`", PAGE))
    assert len(named) >= 15, named  # the pattern still finds the paths
    missing = [p for p in sorted(named) if not (REPO / p).exists()]
    assert not missing, missing


def test_every_layer_class_has_a_contract_test_row():
    layers = {
        name
        for name, cls in inspect.getmembers(flows, inspect.isclass)
        if issubclass(cls, flows.Flow) and cls is not flows.Flow and cls.__module__ == flows.__name__
    }
    rows = {type(make()).__name__ for make, *_ in LAYERS.values()}
    assert layers - rows == EXCEPTIONS, layers - rows
    for name in EXCEPTIONS:  # each named on the page, so a reader knows why it has no row
        assert f"`{name}`" in PAGE, name
