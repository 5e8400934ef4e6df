"""Classification metrics (accuracy, macro-F1, per-class precision/recall/F1) without scikit-learn."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["classification_report"]


def classification_report(predicted: Sequence[int], actual: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    """accuracy, macro_f1 (the unweighted mean over all classes, absent ones scoring 0) and per_class
    {label: {precision, recall, f1, support}}; a 0/0 ratio counts as 0, as scikit-learn's zero_division=0."""
    if len(predicted) != len(actual):
        raise ValueError("predicted and actual differ in length")
    n = len(labels)
    true_pos = [0] * n
    pred_count = [0] * n
    support = [0] * n
    for p, a in zip(predicted, actual, strict=True):
        pred_count[p] += 1
        support[a] += 1
        if p == a:
            true_pos[a] += 1
    per_class: dict[str, dict[str, float | int]] = {}
    f1s = []
    for i, label in enumerate(labels):
        precision = true_pos[i] / pred_count[i] if pred_count[i] else 0.0
        recall = true_pos[i] / support[i] if support[i] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        f1s.append(f1)
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support[i]}
    total = len(actual)
    return {
        "accuracy": sum(true_pos) / total if total else 0.0,
        "macro_f1": sum(f1s) / n if n else 0.0,
        "examples": total,
        "per_class": per_class,
    }
