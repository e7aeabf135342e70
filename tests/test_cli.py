"""The command line: options and output paths, each failure one line and exit status 2."""

from __future__ import annotations

import pytest

from flowmnist.cli import main

# command -> its arguments, with OUT standing for the output path (a file name, or a folder for DIR/)
WRITERS = {
    "sample": ["sample", "--pretrained", "simple", "--out", "OUT/grid.png"],
    "curves": ["curves", "--pretrained", "simple", "--out", "OUT/DIR"],
    "samples": ["samples", "--pretrained", "simple", "--out", "OUT/DIR"],
    "interpolate": ["interpolate", "--pretrained", "simple", "--out", "OUT/DIR"],
    "dequant": ["dequant", "--pretrained", "simple", "--out", "OUT/DIR"],
    "concepts": ["concepts", "--out", "OUT/DIR"],
    "report": ["report", "--pretrained", "simple", "--out", "OUT/DIR"],
    "score": ["score", "--pretrained", "simple", "--data-dir", "NOWHERE", "--out", "OUT/scores.csv"],
    "ood": ["ood", "--pretrained", "simple", "--ood-data", "NOWHERE", "--out", "OUT/ood.png"],
    "compress": ["compress", "--pretrained", "simple", "NOWHERE", "OUT/digits.flow"],
    "decompress": ["decompress", "NOWHERE", "OUT/digits.idx"],
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_an_output_folder_that_cannot_be_made_is_one_line(name, tmp_path, capsys):
    """A regular file where the output's folder should go: no user can make that folder (root included,
    as CI runs), so every writing command must say so in one line, exit 2, and leave the file alone."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = [a.replace("OUT", str(blocker / "sub")) for a in WRITERS[name]]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    option = "--out" if "--out" in args else "OUT"
    assert f"flowmnist {name}: error: {option} {blocker / 'sub'}" in err and "cannot make the folder" in err, err
    assert blocker.read_text() == "x"


def test_a_directory_where_a_file_is_expected_is_refused(tmp_path, capsys):
    assert main(["sample", "--pretrained", "simple", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().endswith(f"--out {tmp_path}: is a directory; expected a file name")


def test_the_output_folder_is_made(tmp_path):
    out = tmp_path / "a" / "b" / "grid.png"
    assert main(["sample", "--pretrained", "simple", "--n", "4", "--out", str(out)]) == 0
    assert out.is_file()
