"""docs/tutorial.ipynb: it executes top to bottom with the shipped models, its stored copy keeps its outputs (so
it reads on GitHub), and its bits per dimension are those of `flowmnist evaluate` on the same digits."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import require_or_skip

from flowmnist.cli import main
from flowmnist.runs import shipped_digits

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "tutorial.ipynb"
BPD_LINE = re.compile(r"^bpd = (\d+\.\d+) \(K = (\d+)\); single-sample bound (\d+\.\d+); (\d+) digits$", re.MULTILINE)


def _nbformat():
    try:
        import nbclient  # noqa: F401
        import nbformat
    except ImportError:
        require_or_skip(False, "nbclient and nbformat not installed (pip install -e '.[test]')")
    return nbformat


def _bpd_cell_text(nb) -> str:
    (cell,) = [c for c in nb.cells if "bpd" in c.metadata.get("tags", [])]
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_stored_notebook_keeps_its_outputs():
    nb = _nbformat().read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))  # run once, in order
    assert all(o.output_type != "error" for c in code for o in c.outputs)
    assert sum("image/png" in o.get("data", {}) for c in code for o in c.outputs) >= 5  # its figures
    assert BPD_LINE.search(_bpd_cell_text(nb))


@pytest.mark.slow
def test_notebook_executes_and_its_bpd_is_that_of_evaluate(tmp_path, capsys):
    from nbclient import NotebookClient

    nb = _nbformat().read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    bpd, k, single, n = BPD_LINE.search(_bpd_cell_text(nb)).groups()
    args = ["evaluate", "--pretrained", "multi-vardeq", "--data-dir", str(shipped_digits()), "--split", "train"]
    assert main([*args, "--max-images", n, "--importance-samples", k, "--timing-reps", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["images"]["train"] == int(n)
    assert r["bpd"]["train"] == pytest.approx(float(bpd), abs=2e-5)
    assert r["bpd_single_sample"]["train"] == pytest.approx(float(single), abs=2e-5)
