"""Markdown tables, the one writer for the evaluation results, the reproduction and the benchmarks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence


def cell(value) -> str:
    """A table cell: None as "-", a float with 3 significant digits, anything else as ``str`` gives it."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence | Mapping]) -> str:
    """A GitHub markdown table: ``header``, then one line per row. A row is its cells (see ``cell``), or a
    mapping whose values under the header's names are its cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        values = [row.get(name) for name in header] if isinstance(row, Mapping) else row
        lines.append("| " + " | ".join(cell(value) for value in values) + " |")
    return "\n".join(lines)
