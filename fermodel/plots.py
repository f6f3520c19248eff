"""Figures as PNG files, drawn with matplotlib's object API (no pyplot state, no display)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure


def plot_class_distribution(
    before: dict[str, int], path, after: dict[str, int] | None = None, title: str = ""
) -> Path:
    """Images per class, before and (if given) after balancing: the paper's Figures 7 and 8."""
    names = list(before)
    fig = Figure(figsize=(7, 3.6), layout="constrained")
    ax = fig.subplots()
    width = 0.4 if after else 0.8
    xs = range(len(names))
    bars = ax.bar(
        [x - width / 2 if after else x for x in xs],
        list(before.values()),
        width,
        label="before balancing" if after else None,
        color="#4c72b0",
    )
    ax.bar_label(bars, fontsize=7)
    if after:
        bars = ax.bar(
            [x + width / 2 for x in xs],
            [after[n] for n in names],
            width,
            label="after balancing",
            color="#dd8452",
        )
        ax.bar_label(bars, fontsize=7)
        ax.legend()
    ax.set_xticks(list(xs), names, rotation=20)
    ax.set_ylabel("images")
    ax.set_title(title or "class distribution")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
