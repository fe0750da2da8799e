"""Accuracy against time per example, one point per config, full attention marked (matplotlib, imported
only when a plot is drawn; no pyplot, so no global figure state and no display needed)."""

from __future__ import annotations

import os

from .configs import FULL_ATTENTION


def plot_accuracy_vs_time(summary: list[dict], path: str | os.PathLike, title: str | None = None) -> str:
    """Write a PNG of accuracy (%) against seconds per example for the rows of ``GridResult.summary``
    (keys ``config``, ``accuracy``, ``seconds_per_example``); returns the path."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'swaa[plot]'") from None
    if not summary:
        raise ValueError("summary is empty: nothing to plot")
    figure = Figure(figsize=(7.5, 4.5 + 0.22 * len(summary)), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    colors = iter(f"C{i}" for i in range(100) if i != 3)  # C3 (red) is the baseline's
    for number, row in enumerate(summary, 1):
        x, y = row["seconds_per_example"], 100 * row["accuracy"]
        baseline = row["config"] == FULL_ATTENTION
        label = f"{number}. {row['config']}" + (" (baseline)" if baseline else "")
        axes.scatter([x], [y], s=160 if baseline else 60, marker="*" if baseline else "o",
                     color="C3" if baseline else next(colors), zorder=3, label=label)
        axes.annotate(str(number), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        if baseline:
            axes.axhline(y, color="C3", linestyle=":", linewidth=1, zorder=1)
    axes.set_xlabel("wall time per example (s)")
    axes.set_ylabel("accuracy (%)")
    axes.set_ylim(-5, 105)
    axes.set_xlim(left=0, right=1.25 * max(row["seconds_per_example"] for row in summary) or 1)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), fontsize=8, frameon=False)
    axes.set_title(title or "SWAA configs: accuracy against time per example", fontsize=10)
    figure.tight_layout()
    figure.savefig(os.fspath(path))
    return os.fspath(path)
