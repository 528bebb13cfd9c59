"""Detection metrics at a threshold and at fixed false-positive rates."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score


def threshold_for_fpr(negative_scores: Sequence[float], target_fpr: float) -> float:
    """The lowest threshold at which at most ``target_fpr`` of negatives score strictly above it.

    A row is flagged when ``score > threshold``.
    """
    negatives = np.sort(np.asarray(negative_scores, dtype=np.float64))[::-1]
    if negatives.size == 0:
        raise ValueError("choosing a threshold for a false-positive rate needs negative examples")
    allowed = int(np.floor(target_fpr * negatives.size + 1e-9))
    if allowed >= negatives.size:
        return float(negatives[-1]) - 1e-12
    return float(negatives[allowed])


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, target_fpr: float) -> float | None:
    if labels.min() == labels.max():
        return None
    threshold = threshold_for_fpr(scores[labels == 0], target_fpr)
    return float((scores[labels == 1] > threshold).mean())


def binary_metrics(labels: Sequence[int], scores: Sequence[float], threshold: float) -> dict[str, float | int | None]:
    """AUROC, AUPRC, F1/precision/recall and FPR at ``threshold`` (flag iff score > threshold), TPR at 1%/5% FPR."""
    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    if y.size == 0:
        raise ValueError("no rows to evaluate")
    flagged = s > threshold
    tp = int((flagged & (y == 1)).sum())
    fp = int((flagged & (y == 0)).sum())
    fn = int((~flagged & (y == 1)).sum())
    positives, negatives = int((y == 1).sum()), int((y == 0).sum())
    both = positives > 0 and negatives > 0
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / positives if positives else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return {
        "auroc": float(roc_auc_score(y, s)) if both else None,
        "auprc": float(average_precision_score(y, s)) if both else None,
        "f1": f1,
        "precision": precision,
        "recall": recall,
        "tpr_at_threshold": recall,
        "fpr_at_threshold": fp / negatives if negatives else None,
        "tpr_at_1pct_fpr": tpr_at_fpr(y, s, 0.01),
        "tpr_at_5pct_fpr": tpr_at_fpr(y, s, 0.05),
        "threshold": float(threshold),
        "n": int(y.size),
        "n_positive": positives,
        "n_negative": negatives,
    }
