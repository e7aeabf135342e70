"""The static HTML report: its content, and every image loading in a headless browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import require_or_skip
from helpers import assert_png

from flowmnist.cli import main

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]


@pytest.fixture(scope="module")
def report(tiny_run, tmp_path_factory) -> Path:
    # A results.json as `flowmnist evaluate` writes it (evaluating for real would only add minutes).
    results = {
        "model": "simple",
        "params": 556312,
        "bpd": {"train": 2.5, "val": 2.75},
        "inference_ms_per_64": 900.0,
        "sampling_ms_per_64": 1000.0,
    }
    (tiny_run / "results.json").write_text(json.dumps(results))
    out = tmp_path_factory.mktemp("report")
    assert main(["report", str(tiny_run), "--out", str(out), "--n", "16", "--images", "16", "--steps", "5"]) == 0
    return out / "index.html"


def test_report_links_local_images_only(report):
    page = report.read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) == 10  # 2 curves, 2 samples (T = 1, 0.7), 2 interpolations, 1 dequant, 3 concepts
    for src in srcs:
        assert not src.startswith(("/", "http:", "https:", "file:")), src
        assert_png(report.parent / src)
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # nothing fetched from the network
    assert "<td>simple</td>" in page and '<td class="num">2.750</td>' in page  # the results table
    assert "&quot;model&quot;: &quot;simple&quot;" in page  # the run config
    assert "flowmnist interpolate " in page and "flowmnist report " in page  # the commands


def _dump_dom(index: Path) -> str:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom"]
        done = subprocess.run([*cmd, index.as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _body_flags(dom: str) -> tuple[str | None, str | None]:
    body = re.search(r"<body([^>]*)>", dom)
    assert body, "no <body> in the dumped DOM"
    ok = re.search(r'data-images-ok="(\w+)"', body.group(1))
    count = re.search(r'data-images-count="(\d+)"', body.group(1))
    return (ok and ok.group(1)), (count and count.group(1))


def test_report_renders_with_every_image_loaded(report, tmp_path):
    require_or_skip(CHROMIUM is not None, "chromium not installed (apt-get install chromium): no browser check")
    assert _body_flags(_dump_dom(report)) == ("true", "10")  # 9 figures + the T = 0.7 sample grid
    # A screenshot renders too (the page lays out offline).
    with tempfile.TemporaryDirectory() as profile:
        shot = tmp_path / "shot.png"
        cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--window-size=1200,2400", f"--screenshot={shot}"]
        subprocess.run([*cmd, report.as_uri()], capture_output=True, timeout=120, check=True)
    assert_png(shot, min_w=1000, min_h=2000)
    # The check can fail: a copy of the report with one image broken reports it.
    broken = tmp_path / "broken"
    shutil.copytree(report.parent, broken)
    (broken / "samples.png").write_bytes(b"not a png")
    assert _body_flags(_dump_dom(broken / "index.html")) == ("false", "10")


def test_every_command_in_the_report_parses(report):
    """The report's command lines come from commands.argv; each must be one the parser accepts."""
    import html
    import shlex

    from flowmnist.cli import build_parser

    lines = [re.sub("</?pre>", "", ln) for ln in report.read_text().splitlines()]
    lines = [html.unescape(ln) for ln in lines if ln.startswith("flowmnist ")]
    assert len(lines) == 8  # the report, curves, 2 samples, 2 interpolations, dequant, concepts
    for line in lines:
        words = shlex.split(line)
        assert build_parser().parse_args(words[1:]).command == words[1], line


def test_runs_are_named_as_a_user_names_them(tiny_run, tmp_path):
    """A shipped run by --pretrained NAME (its install path means nothing to a reader), a run by its path."""
    from flowmnist.config import Config
    from flowmnist.figures import LoadedRun
    from flowmnist.report import ReportSpec, page
    from flowmnist.runs import PRETRAINED_ROOT

    named = [
        LoadedRun(PRETRAINED_ROOT / "simple", None, Config(), "simple"),
        LoadedRun(tiny_run, None, Config(), "mine"),
    ]
    spec = ReportSpec(runs=named, out_dir=tmp_path)
    runs = next(line for line in page(spec, []).splitlines() if line.startswith("<p>Runs:"))
    assert "simple (<code>--pretrained simple</code>)" in runs and f"mine (<code>{tiny_run}</code>)" in runs
    assert str(PRETRAINED_ROOT) not in runs


def test_captions_name_the_split_the_digits_come_from(tmp_path):
    from flowmnist.report import split_words

    assert split_words(["val", "val"]) == "validation split"
    assert split_words(["test"]) == "test split"
    assert "row labels" in split_words(["val", "test"])


def test_the_report_loads_each_run_and_its_digits_once(tiny_run, tmp_path, monkeypatch):
    """Two runs in one report: each model is read from its checkpoint once and each run's digits once, and
    every figure and section gets them from there (figures.LoadedRun)."""
    import flowmnist.data
    import flowmnist.figures
    from flowmnist.report import build_report

    calls = {"model": [], "data": 0}
    load_model, load_data = flowmnist.figures.load_model, flowmnist.data.load_data

    def counted_model(run, *args, **kw):
        calls["model"].append(Path(run))
        return load_model(run, *args, **kw)

    def counted_data(*args, **kw):
        calls["data"] += 1
        return load_data(*args, **kw)

    monkeypatch.setattr(flowmnist.figures, "load_model", counted_model)
    monkeypatch.setattr(flowmnist.data, "load_data", counted_data)
    other = tmp_path / "other"
    shutil.copytree(tiny_run, other)
    build_report([tiny_run, other], tmp_path / "report", pairs=1, steps=3, samples=4, dequant_images=4)
    assert sorted(calls["model"]) == sorted([tiny_run, other]) and calls["data"] == 2
