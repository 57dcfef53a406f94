"""Classification metrics for fraud scores: AUPRC, ROC AUC, threshold metrics, bootstrap CIs.

Plain numpy/scikit-learn. A transaction is flagged when ``score >= threshold`` (the convention of
``sklearn.metrics.precision_recall_curve``, so a threshold it returns reproduces its point).
Metrics that are undefined on the given labels (e.g. ROC AUC with one class) are NaN.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

DEFAULT_THRESHOLD = 0.5


def _check(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(np.int64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    return y, s


def auprc(labels, scores) -> float:
    """Area under the precision-recall curve (average precision); NaN without positives."""
    y, s = _check(labels, scores)
    return float(average_precision_score(y, s)) if y.any() else float("nan")


def roc_auc(labels, scores) -> float:
    """ROC AUC; NaN unless both classes occur."""
    y, s = _check(labels, scores)
    return float(roc_auc_score(y, s)) if 0 < y.sum() < y.size else float("nan")


def at_threshold(labels, scores, threshold: float = DEFAULT_THRESHOLD) -> dict[str, float]:
    """Precision, recall, F1 and accuracy of flagging ``score >= threshold``."""
    y, s = _check(labels, scores)
    flagged = s >= threshold
    tp = int(np.sum(flagged & (y == 1)))
    fp = int(np.sum(flagged & (y == 0)))
    fn = int(np.sum(~flagged & (y == 1)))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    accuracy = float(np.mean(flagged == (y == 1))) if y.size else float("nan")
    return {"precision": precision, "recall": recall, "f1": f1, "accuracy": accuracy}


def best_f1_threshold(labels, scores) -> float:
    """The score threshold with the highest F1 (choose it on validation, apply it to test)."""
    y, s = _check(labels, scores)
    if not y.any():
        return DEFAULT_THRESHOLD
    precision, recall, thresholds = precision_recall_curve(y, s)
    # The last (precision 1, recall 0) point has no threshold.
    p, r = precision[:-1], recall[:-1]
    f1 = np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=(p + r) > 0)
    return float(thresholds[int(np.argmax(f1))])


def report(labels, scores, threshold: float) -> dict[str, float]:
    """All metrics of one score set: ``auprc``, ``roc_auc``, precision/recall/f1/accuracy at 0.5
    (plain names) and at ``threshold`` (``*_at_threshold``), and ``threshold`` itself."""
    out = {"auprc": auprc(labels, scores), "roc_auc": roc_auc(labels, scores)}
    out.update(at_threshold(labels, scores, DEFAULT_THRESHOLD))
    out.update({f"{k}_at_threshold": v for k, v in at_threshold(labels, scores, threshold).items()})
    out["threshold"] = float(threshold)
    return out


def bootstrap_ci(labels, scores, metric: Callable[[np.ndarray, np.ndarray], float],
                 n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``metric(labels, scores)`` (resampling rows)."""
    y, s = _check(labels, scores)
    if y.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, y.size, y.size)
        value = metric(y[idx], s[idx])
        if np.isfinite(value):
            values.append(value)
    if not values:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)
