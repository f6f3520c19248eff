"""Classification metrics from a confusion matrix: accuracy, per-class recall, macro F1."""

from __future__ import annotations

import torch


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[K, K] counts; row = true class, column = predicted class."""
    index = labels.long() * num_classes + preds.long()
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def summarize(cm: torch.Tensor, classes: tuple[str, ...]) -> dict[str, float]:
    """accuracy, macro_f1, recall_<class> for every class (NaN where a class has no image) and
    min_recall, the lowest of them (the class a model serves worst).

    Macro F1 averages the per-class F1 over the classes that occur among the labels or the
    predictions (scikit-learn's convention), a class with no true positive scoring 0.
    """
    cm = cm.double()
    tp = cm.diagonal()
    support, predicted = cm.sum(1), cm.sum(0)
    total = cm.sum()
    present = (support + predicted) > 0
    f1 = torch.where(present, 2 * tp / (support + predicted).clamp(min=1), torch.zeros_like(tp))
    out = {
        "accuracy": (tp.sum() / total).item() if total else float("nan"),
        "macro_f1": f1[present].mean().item() if present.any() else float("nan"),
    }
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.full_like(tp, float("nan")))
    for name, value in zip(classes, recall.tolist(), strict=True):
        out[f"recall_{name}"] = value
    supported = recall[support > 0]
    out["min_recall"] = supported.min().item() if len(supported) else float("nan")
    return out
