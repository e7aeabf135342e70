"""Tables as rows: the same cells as a Markdown pipe table and as escaped HTML."""

from __future__ import annotations

from flowmnist.tables import Table


def test_table_html_escapes_and_aligns():
    table = Table(["Model", "bpd"], [["<b>x</b>", "1.000"]], [False, True])
    assert table.markdown() == "| Model | bpd |\n|---|---:|\n| <b>x</b> | 1.000 |"
    out = table.html()
    assert "<th>Model</th>" in out and "&lt;b&gt;x&lt;/b&gt;" in out and "<b>" not in out
    assert '<td class="num">1.000</td>' in out and "<td>&lt;b&gt;x&lt;/b&gt;</td>" in out
