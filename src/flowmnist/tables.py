"""A table as rows of text cells, rendered to a Markdown pipe table (the CLI, the README) or to HTML (the
report): one source for both, no parsing back."""

from __future__ import annotations

import html
from dataclasses import dataclass


@dataclass(frozen=True)
class Table:
    """``header`` and ``rows`` of formatted cells; ``right[i]``: column i holds numbers (right-aligned)."""

    header: list[str]
    rows: list[list[str]]
    right: list[bool]

    def markdown(self) -> str:
        """A pipe table; a right-aligned column's rule is ``---:``."""
        lines = ["| " + " | ".join(self.header) + " |", "|" + "".join("---:|" if r else "---|" for r in self.right)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)

    def html(self) -> str:
        """An HTML table; a right-aligned column's cells have class "num". Cells are escaped: model names and
        paths come from files."""
        out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in self.header) + "</tr>"]
        for row in self.rows:
            cells = (
                f'<td class="num">{html.escape(c)}</td>' if r else f"<td>{html.escape(c)}</td>"
                for c, r in zip(row, self.right, strict=False)
            )
            out.append("<tr>" + "".join(cells) + "</tr>")
        out.append("</table>")
        return "\n".join(out)
