"""The tour's report: sections of prose, tables and charts, written as report/index.html.

Each part of the lab contributes a section through `tour_section(report, profile)`; the
report also keeps a summary table (one row per headline figure) printed at the end.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[tuple[str, list[dict[str, Any]]]] = field(default_factory=list)
    figures: list[tuple[str, Path]] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None


@dataclass
class SummaryRow:
    what: str
    value: str
    note: str = ""


class Report:
    """Collects sections; `write()` renders HTML with the charts next to it."""

    def __init__(self, out_dir: str | Path = "report", title: str = "disagg-lab tour") -> None:
        self.out_dir = Path(out_dir)
        self.fig_dir = self.out_dir / "figures"
        self.fig_dir.mkdir(parents=True, exist_ok=True)
        self.title = title
        self.sections: list[Section] = []
        self.summary: list[SummaryRow] = []
        self.data: dict[str, Any] = {}

    def section(self, title: str) -> Section:
        s = Section(title)
        self.sections.append(s)
        return s

    def add_figure(self, section: Section, fig: Any, name: str, caption: str) -> Path:
        """Saves a matplotlib figure under figures/ and attaches it; returns the PNG path."""
        import matplotlib.pyplot as plt

        path = self.fig_dir / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        section.figures.append((caption, path))
        return path

    def add_summary(self, what: str, value: str, note: str = "") -> None:
        self.summary.append(SummaryRow(what, value, note))

    def summary_table(self) -> str:
        """The summary as a fixed-width text table (what the tour prints last)."""
        rows = [("what", "value", "note")] + [(r.what, r.value, r.note) for r in self.summary]
        w = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [" | ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in rows]
        lines.insert(1, "-+-".join("-" * x for x in w))
        return "\n".join(lines)

    def write(self) -> Path:
        """Writes index.html (and data.json with the raw figures); returns index.html's path."""
        parts = [
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>",
            (
                "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
                "line-height:1.45}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
                "padding:4px 8px;text-align:right}th{background:#f3f3f3}td:first-child,th:first-child"
                "{text-align:left}img{max-width:100%;border:1px solid #eee}.err{color:#b00}"
                "figcaption{color:#555;margin-bottom:1.5em}</style></head><body>"
            ),
            f"<h1>{html.escape(self.title)}</h1>",
            f"<p>Written {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}.</p>",
        ]
        if self.summary:
            parts.append(
                "<h2>Summary</h2>"
                + _html_table([{"what": r.what, "value": r.value, "note": r.note} for r in self.summary])
            )
        for s in self.sections:
            parts.append(f"<h2>{html.escape(s.title)}</h2>")
            if s.error:
                parts.append(f"<p class='err'>This part failed: {html.escape(s.error)}</p>")
            parts += [f"<p>{html.escape(p)}</p>" for p in s.paragraphs]
            for caption, rows in s.tables:
                parts.append(f"<h3>{html.escape(caption)}</h3>" + _html_table(rows))
            for caption, path in s.figures:
                rel = path.relative_to(self.out_dir).as_posix()
                parts.append(
                    f"<figure><img src='{rel}' alt='{html.escape(caption)}'>"
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>"
                )
            parts.append(f"<p><small>{s.seconds:.1f} s</small></p>")
        parts.append("</body></html>")
        index = self.out_dir / "index.html"
        index.write_text("\n".join(parts), encoding="utf-8")
        (self.out_dir / "data.json").write_text(json.dumps(self.data, indent=1, default=str))
        return index


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}"
    return str(v)


def _html_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "<p>(no rows)</p>"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c, '')))}</td>" for c in cols) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"
