"""Figures as PNG files, drawn with matplotlib's object API (no pyplot state, no display)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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
    return _save(fig, path)


def draw_confusion(ax, cm, fontsize: int):
    """A confusion matrix on ``ax``, rows normalised (a row without images stays 0), each cell
    labelled with its fraction; returns the image (for a colour bar)."""
    counts = np.asarray(cm, dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    norm = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for (i, j), value in np.ndenumerate(norm):
        color = "white" if value > 0.5 else "black"
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=fontsize, color=color)
    return image


def plot_confusion_matrix(cm, classes, path, title: str = "") -> Path:
    """Row-normalised confusion matrix (each true class sums to 1), as the paper's Figures 11
    and 12; the cell text is the fraction, the colour its size."""
    k = len(classes)
    fig = Figure(figsize=(1.0 + 0.75 * k, 0.8 + 0.7 * k), layout="constrained")
    ax = fig.subplots()
    image = draw_confusion(ax, cm, fontsize=8)
    ax.set_xticks(range(k), classes, rotation=35, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix (rows normalised)")
    fig.colorbar(image, ax=ax, shrink=0.8)
    return _save(fig, path)


def plot_curves(history: list[dict], path, title: str = "") -> Path:
    """Accuracy and loss per epoch, training and validation (the paper's Figures 9 and 10)."""
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(9, 3.4), layout="constrained")
    acc, loss = fig.subplots(1, 2)
    acc.plot(epochs, [h["train_accuracy"] for h in history], label="train")
    acc.plot(epochs, [h["val_accuracy"] for h in history], label="validation")
    acc.set_xlabel("epoch")
    acc.set_ylabel("accuracy")
    acc.legend()
    loss.plot(epochs, [h["train_ce"] for h in history], label="train (cross-entropy)")
    loss.plot(epochs, [h["val_loss"] for h in history], label="validation (cross-entropy)")
    loss.set_xlabel("epoch")
    loss.set_ylabel("loss")
    loss.legend()
    fig.suptitle(title or "training curves")
    return _save(fig, path)


def plot_trial(result, folder, title: str = "") -> None:
    """A trial's figures: ``confusion_matrix.png`` (test) and ``curves.png``."""
    folder = Path(folder)
    plot_confusion_matrix(
        result.test_confusion, result.classes, folder / "confusion_matrix.png", title=title
    )
    plot_curves(result.history, folder / "curves.png")


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
