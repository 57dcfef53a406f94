"""Classification metrics for fraud scores: AUPRC, ROC AUC, threshold metrics, operating
thresholds and the (paired) bootstrap.

Plain numpy/scikit-learn. A transaction is flagged when ``score >= threshold`` (the convention of
``sklearn.metrics.precision_recall_curve``, so a threshold it returns reproduces its point).
Metrics that are undefined on the given labels (e.g. ROC AUC with one class) are NaN.

The bootstrap is a Poisson bootstrap: a resample weighs each transaction by an independent
Poisson(1) count (how often it was drawn), and every metric here is computed from such counts as
sample weights: a resample's AUPRC equals scikit-learn's ``average_precision_score`` on the
resampled rows. Fraud is rare, so the non-fraud rows are grouped into cells that the metrics
cannot tell apart (``_Cells``) and a cell's weight is drawn at once: on a test period of 1.5M
transactions a resample costs the cells (a few per fraud row), not the rows. Two score sets are
resampled with the same weights (``bootstrap`` with two models): a paired bootstrap, whose
per-resample differences give the interval of a difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Mapping

import numpy as np
from sklearn.metrics import precision_recall_curve

DEFAULT_THRESHOLD = 0.5
# Metrics that ``bootstrap`` resamples; the threshold ones are taken at each model's threshold.
RANKING_METRICS = ("auprc", "roc_auc")
THRESHOLD_METRICS = ("precision", "recall", "f1", "alert_rate")
BOOTSTRAP_METRICS = RANKING_METRICS + THRESHOLD_METRICS
_BLOCK_ELEMENTS = 4_000_000  # resamples x transactions per vectorized block (~32 MB per float array)


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
    """Area under the precision-recall curve (average precision, as scikit-learn's
    ``average_precision_score``); NaN without positives. No sort of all rows: the non-fraud
    rows are placed among the fraud scores (``_Cells``), fast on a test period of millions."""
    return metric_value(labels, scores, "auprc")


def roc_auc(labels, scores) -> float:
    """ROC AUC (as scikit-learn's ``roc_auc_score``, ties counted half); NaN unless both classes occur."""
    return metric_value(labels, scores, "roc_auc")


def pr_points(labels, scores) -> tuple[np.ndarray, np.ndarray, float]:
    """(precision, recall, auprc): precision and recall of flagging ``score >= t`` at each
    distinct fraud score ``t``, highest first: the points of the precision-recall curve where
    recall moves (the rest of the curve only lowers precision at a constant recall), one per
    fraud score instead of one per row, and the area, by the code of ``auprc`` (``_Cells``)."""
    y, s = _check(labels, scores)
    cells = _Cells(y, {"model": s}, "auprc", {})
    return (*cells.curve("model"), cells.value("model"))


def _ranking(labels, scores) -> dict[str, float]:
    """``auprc`` and ``roc_auc`` from one placing of the rows (``_Cells``: 1.6 s at 6.2M rows)."""
    y, s = _check(labels, scores)
    cells = _Cells(y, {"model": s}, "auprc", {})
    return {metric: cells.value("model", metric) for metric in RANKING_METRICS}


def at_threshold(labels, scores, threshold: float = DEFAULT_THRESHOLD) -> dict[str, float]:
    """Precision, recall, F1, accuracy and alert rate (fraction flagged) of flagging
    ``score >= threshold``."""
    y, s = _check(labels, scores)
    flagged = s >= threshold
    tp = int(np.sum(flagged & (y == 1)))
    fp = int(np.sum(flagged & (y == 0)))
    fn = int(np.sum(~flagged & (y == 1)))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    accuracy = float(np.mean(flagged == (y == 1))) if y.size else float("nan")
    alert_rate = float(np.mean(flagged)) if y.size else float("nan")
    return {"precision": precision, "recall": recall, "f1": f1, "accuracy": accuracy, "alert_rate": alert_rate}


def choose_threshold(labels, scores, alert_rate: float | None = None) -> float:
    """The operating threshold of a model, chosen on its validation labels and scores.

    Without ``alert_rate``: the threshold with the highest F1. With ``alert_rate`` (a fraction in
    (0, 1)): the lowest threshold that flags at most that fraction of the transactions, i.e. the
    score of the ``floor(alert_rate * n)``-th highest, raised past a tie that would exceed the
    budget. Errors: ``alert_rate`` outside (0, 1); a budget of less than one transaction; no
    fraud in the labels (F1-max is undefined); scores whose highest value alone exceeds the budget.
    """
    y, s = _check(labels, scores)
    if alert_rate is not None:
        if isinstance(alert_rate, bool) or not isinstance(alert_rate, (int, float, np.floating)) \
                or not 0.0 < float(alert_rate) < 1.0:
            raise ValueError(f"alert_rate must be a fraction strictly between 0 and 1, got {alert_rate!r}")
        budget = math.floor(float(alert_rate) * s.size)
        if budget < 1:
            raise ValueError(f"alert_rate {alert_rate:g} flags fewer than one of the {s.size:,} transactions")
        ordered = np.sort(s)[::-1]
        threshold = ordered[budget - 1]
        if budget < s.size and ordered[budget] == threshold:  # a tie straddles the budget: flag fewer
            higher = ordered[ordered > threshold]
            if higher.size == 0:
                raise ValueError(f"alert_rate {alert_rate:g}: the highest score {threshold:g} is shared by more "
                                 f"than {budget:,} of the {s.size:,} transactions, no threshold flags so few")
            threshold = higher[-1]
        return float(threshold)
    if not y.any():
        raise ValueError("no fraud among the labels: the F1-maximizing threshold is undefined "
                         "(give alert_rate, or choose on a validation set with fraud)")
    precision, recall, thresholds = precision_recall_curve(y, s)
    # The last (precision 1, recall 0) point has no threshold.
    p, r = precision[:-1], recall[:-1]
    f1 = np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=(p + r) > 0)
    return float(thresholds[int(np.argmax(f1))])


def report(labels, scores, threshold: float) -> dict[str, float]:
    """All metrics of one score set: ``auprc``, ``roc_auc``, precision/recall/f1/accuracy/alert_rate
    at 0.5 (plain names) and at ``threshold`` (``*_at_threshold``), and ``threshold`` itself."""
    out = _ranking(labels, scores)
    out.update(at_threshold(labels, scores, DEFAULT_THRESHOLD))
    out.update({f"{k}_at_threshold": v for k, v in at_threshold(labels, scores, threshold).items()})
    out["threshold"] = float(threshold)
    return out


# --- bootstrap ----------------------------------------------------------------------------------


class _Cells:
    """The rows of one or more score sets, compressed for resampling: every fraud row is kept,
    and the non-fraud rows fall into cells of rows that every metric here treats alike (per
    model: the same position among its distinct fraud scores, ties included, and the same side
    of its threshold). A Poisson bootstrap draws a weight per fraud row and, per cell, the sum
    of its rows' weights (a Poisson variable of mean the cell's size): the same distribution as
    a weight per row, at the cost of the cells (a few per fraud row) instead of the rows."""

    def __init__(self, y: np.ndarray, scores: Mapping[str, np.ndarray], metric: str,
                 thresholds: Mapping[str, float | None]):
        if metric not in BOOTSTRAP_METRICS:
            raise KeyError(f"unknown metric {metric!r}: use one of {', '.join(BOOTSTRAP_METRICS)}")
        self.metric = metric
        fraud, other = y == 1, y == 0
        self.n_fraud = int(fraud.sum())
        keys, self.models = np.zeros(int(other.sum()), dtype=np.int64), {}
        for name, s in scores.items():
            threshold = thresholds.get(name)
            if metric in THRESHOLD_METRICS and threshold is None:
                raise ValueError(f"metric {metric!r} needs a threshold")
            u = np.unique(s[fraud])  # distinct fraud scores, ascending: where recall moves
            rest = s[other]
            # 2k + 1: equal to u[k]; 2k: between u[k - 1] and u[k] (the ends: below all, above all).
            code = np.searchsorted(u, rest, "left") + np.searchsorted(u, rest, "right")
            flag = rest >= threshold if threshold is not None else np.zeros(rest.size, dtype=bool)
            keys = (keys * (2 * u.size + 1) + code) * 2 + flag
            self.models[name] = {"groups": u.size, "code": code, "flag": flag,
                                 "fraud_group": np.searchsorted(u, s[fraud]),
                                 "fraud_flag": s[fraud] >= threshold if threshold is not None else None}
        _, first, self.cell_of, self.sizes = np.unique(keys, return_index=True, return_inverse=True,
                                                        return_counts=True)  # cell_of: each non-fraud row's cell
        for m in self.models.values():  # per cell, not per row
            m["code"], m["flag"] = m["code"][first], m["flag"][first]
        self.sizes = self.sizes.astype(np.float64)

    def draws(self, n_boot: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Blocks of resamples: (cell weights (block, cells), fraud weights (block, fraud))."""
        rng = np.random.default_rng(seed)
        block = max(1, min(n_boot, _BLOCK_ELEMENTS // max(self.sizes.size + self.n_fraud, 1)))
        for start in range(0, n_boot, block):
            b = min(block, n_boot - start)
            yield (rng.poisson(self.sizes, (b, self.sizes.size)).astype(np.float64),
                   rng.poisson(1.0, (b, self.n_fraud)).astype(np.float64))

    def all_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """The weights of the rows as given: one resample."""
        return self.sizes[None, :], np.ones((1, self.n_fraud))

    def __call__(self, cells: np.ndarray, fraud: np.ndarray) -> dict[str, np.ndarray]:
        """Per model, the metric under each resample's weights; NaN where it is undefined."""
        return {name: self._metric(m, cells, fraud, self.metric) for name, m in self.models.items()}

    def value(self, name: str, metric: str | None = None) -> float:
        """Model ``name``'s ``metric`` on the rows as given; by default the cells' own metric,
        else another that the same cells serve (the ranking metrics share theirs)."""
        return float(self._metric(self.models[name], *self.all_rows(), metric or self.metric)[0])

    def _metric(self, m: dict, cells: np.ndarray, fraud: np.ndarray, metric: str) -> np.ndarray:
        b = cells.shape[0]
        pos = fraud.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            if metric in THRESHOLD_METRICS:
                tp = fraud @ m["fraud_flag"].astype(np.float64)
                flagged = tp + cells @ m["flag"].astype(np.float64)
                if metric == "alert_rate":
                    return flagged / (pos + cells.sum(axis=1))
                precision = np.where(flagged > 0, tp / flagged, 0.0)
                recall = np.where(pos > 0, tp / pos, 0.0)
                if metric == "precision":
                    return precision
                if metric == "recall":
                    return recall
                return np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
            others, frauds = self._per_position(m, cells, fraud)
            if metric == "auprc":
                # average_precision_score: sum over the fraud scores u[k] of (recall step) x precision
                # at threshold u[k].
                precision, _ = self._curve(others, frauds)
                out = np.sum(frauds * precision, axis=1) / pos
                return np.where(pos > 0, out, np.nan)
            # roc_auc: each fraud of group k beats the others below u[k], and ties with those equal.
            below = np.cumsum(others, axis=1)[:, 0:-1:2]
            equal = others[:, 1::2]
            negatives = others.sum(axis=1)
            out = np.sum(frauds * (below + 0.5 * equal), axis=1) / (pos * negatives)
            return np.where((pos > 0) & (negatives > 0), out, np.nan)


    @staticmethod
    def _per_position(m: dict, cells: np.ndarray, fraud: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per resample: the others' weight at each position code (block, 2g + 1) and the fraud's
        weight per distinct fraud score, lowest first (block, g)."""
        b, g = cells.shape[0], m["groups"]
        offsets = (np.arange(b) * (2 * g + 1))[:, None]
        others = np.bincount((m["code"][None, :] + offsets).ravel(), weights=cells.ravel(),
                             minlength=b * (2 * g + 1)).reshape(b, 2 * g + 1)
        frauds = np.bincount((m["fraud_group"][None, :] + (np.arange(b) * max(g, 1))[:, None]).ravel(),
                             weights=fraud.ravel(), minlength=b * max(g, 1)).reshape(b, max(g, 1))[:, :g]
        return others, frauds

    @staticmethod
    def _curve(others: np.ndarray, frauds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(precision, true positives) of flagging ``score >= u[k]`` at each distinct fraud score
        ``u[k]``: flagged are the fraud from group k up and the others whose code is 2k + 1 or more."""
        tps = np.cumsum(frauds[:, ::-1], axis=1)[:, ::-1]
        flagged = tps + np.cumsum(others[:, ::-1], axis=1)[:, ::-1][:, 1::2]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(flagged > 0, tps / flagged, 0.0), tps

    def curve(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(precision, recall) of model ``name`` on the rows as given at each distinct fraud
        score, highest first."""
        cells, fraud = self.all_rows()
        precision, tps = self._curve(*self._per_position(self.models[name], cells, fraud))
        return precision[0, ::-1], tps[0, ::-1] / max(self.n_fraud, 1)


def metric_value(labels, scores, metric: str, threshold: float | None = None) -> float:
    """One bootstrap metric (``BOOTSTRAP_METRICS``) on the rows as given, by the same code as
    ``bootstrap`` (equal to ``auprc``/``roc_auc``/``at_threshold`` up to float rounding)."""
    y, s = _check(labels, scores)
    return _Cells(y, {"model": s}, metric, {"model": threshold}).value("model")


@dataclass(frozen=True)
class Bootstrap:
    """What ``bootstrap`` measured: per model, the value on all rows and its percentile interval;
    with two models, the paired interval of ``first - second``."""
    metric: str
    level: float
    n_boot: int  # resamples with the metric defined for every model (others are dropped)
    n_rows: int
    seed: int
    values: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    delta: float | None = None  # values[first] - values[second]
    delta_interval: tuple[float, float] | None = None


def bootstrap(labels, scores: Mapping[str, np.ndarray], metric: str = "auprc", n_boot: int = 1000,
              level: float = 0.95, seed: int = 0,
              thresholds: Mapping[str, float] | None = None) -> Bootstrap:
    """Percentile bootstrap of ``metric`` for one or two named score sets of the same rows.

    The score sets are resampled with the same rows (paired): with two, ``delta_interval`` is
    the interval of the per-resample difference (first minus second), so that identical scores
    give exactly [0, 0]. Threshold metrics use ``thresholds[name]``. Resamples where the metric
    is undefined for some model (no fraud drawn) are dropped; none left is a ValueError.
    """
    if not scores or len(scores) > 2:
        raise ValueError(f"bootstrap takes one or two score sets, got {len(scores)}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be strictly between 0 and 1, got {level!r}")
    thresholds = thresholds or {}
    checked = {name: _check(labels, s) for name, s in scores.items()}
    y = next(iter(checked.values()))[0]
    if y.size == 0:
        raise ValueError("no rows to bootstrap")
    cells = _Cells(y, {name: s for name, (_, s) in checked.items()}, metric, thresholds)
    values = {name: float(v[0]) for name, v in cells(*cells.all_rows()).items()}
    if not all(np.isfinite(v) for v in values.values()):
        raise ValueError(f"{metric} is undefined on these labels ({int(y.sum()):,} fraud of {y.size:,})")
    draws = {name: [] for name in checked}
    for block in cells.draws(int(n_boot), seed):
        for name, v in cells(*block).items():
            draws[name].append(v)
    stacked = np.vstack([np.concatenate(d) for d in draws.values()])  # (models, n_boot)
    stacked = stacked[:, np.isfinite(stacked).all(axis=0)]
    if stacked.shape[1] == 0:
        raise ValueError(f"{metric} is undefined on every resample")
    tail = (1 - level) / 2
    intervals = {name: tuple(float(q) for q in np.quantile(row, [tail, 1 - tail]))
                 for name, row in zip(checked, stacked)}
    delta = delta_interval = None
    if len(checked) == 2:
        first, second = values.values()
        delta = first - second
        delta_interval = tuple(float(q) for q in np.quantile(stacked[0] - stacked[1], [tail, 1 - tail]))
    return Bootstrap(metric, float(level), int(stacked.shape[1]), int(y.size), int(seed), values, intervals,
                     delta, delta_interval)


def bootstrap_ci(labels, scores, metric: str = "auprc", n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0, threshold: float | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of one score set's ``metric`` (resampling rows)."""
    result = bootstrap(labels, {"model": scores}, metric, n_boot, level, seed,
                       None if threshold is None else {"model": threshold})
    return result.intervals["model"]
