"""The promotion rule: a paired bootstrap of (challenger - champion) on the same test transactions.

The challenger replaces the champion only when the lower bound of the ``level`` paired
bootstrap interval of ``metric(challenger) - metric(champion)`` is above ``min_improvement``:
a difference that the test set cannot tell from noise does not promote, and an identical
retrain (interval [0, 0]) is rejected. The default metric, AUPRC, needs no threshold; the
threshold metrics (precision, recall, f1) are taken at each model's own operating threshold.
The first model of a project is promoted because there is nothing to compare it with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from fraudlib import metrics

PROMOTE = "promote"
REJECT = "reject"
DEFAULT_METRIC = "auprc"
# Metrics a decision can use; alert_rate is reported, never a goal (flagging more is not better).
METRICS = ("auprc", "roc_auc", "precision", "recall", "f1")


@dataclass(frozen=True)
class Decision:
    decision: str  # PROMOTE or REJECT
    reason: str
    metric: str
    challenger_value: float | None
    champion_value: float | None
    min_improvement: float
    delta: float | None = None  # challenger_value - champion_value
    delta_low: float | None = None  # paired bootstrap interval of the delta
    delta_high: float | None = None
    level: float | None = None  # of the interval, e.g. 0.95
    n_boot: int | None = None  # resamples behind the interval
    n_transactions: int | None = None  # test transactions resampled
    seed: int | None = None
    challenger_interval: tuple[float, float] | None = None  # each model's own interval
    champion_interval: tuple[float, float] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise KeyError(f"unknown promotion metric {metric!r}: use one of {', '.join(METRICS)}")
    return metric


def check_settings(metric: str = DEFAULT_METRIC, min_improvement: float = 0.0, n_boot: int = 1000,
                   level: float = 0.95, seed: int = 0) -> None:
    """Fails early (KeyError/ValueError) on settings that ``decide`` would refuse."""
    check_metric(metric)
    if isinstance(min_improvement, bool) or not isinstance(min_improvement, (int, float)) \
            or not np.isfinite(min_improvement):
        raise ValueError(f"min_improvement must be a finite number, got {min_improvement!r}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"bootstrap_samples must be a positive integer, got {n_boot!r}")
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 < level < 1.0:
        raise ValueError(f"confidence_level must be strictly between 0 and 1, got {level!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"bootstrap_seed must be a non-negative integer, got {seed!r}")


def decide(labels, challenger_scores, champion_scores=None, metric: str = DEFAULT_METRIC,
           min_improvement: float = 0.0, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
           challenger_threshold: float | None = None, champion_threshold: float | None = None) -> Decision:
    """Promote when the lower bound of the paired bootstrap interval of
    ``metric(challenger) - metric(champion)`` over the test transactions is > ``min_improvement``.

    ``champion_scores`` None: no champion, the challenger is promoted (its own interval is still
    reported). The thresholds are each model's operating threshold (threshold metrics only).
    """
    check_settings(metric, min_improvement, n_boot, level, seed)
    scores = {"challenger": challenger_scores}
    thresholds = {"challenger": challenger_threshold}
    if champion_scores is not None:
        scores["champion"], thresholds["champion"] = champion_scores, champion_threshold
    if metric in metrics.THRESHOLD_METRICS:
        missing = [name for name, t in thresholds.items() if t is None]
        if missing:
            raise ValueError(f"promotion metric {metric!r} needs the operating threshold of the {' and '.join(missing)}")
    classes = np.unique(np.asarray(labels))
    if classes.size < 2:
        # AUPRC, recall, ... are undefined without both classes: no evidence either way.
        what = "no transactions" if classes.size == 0 else \
            f"one class only ({len(labels):,} {'fraud' if classes[0] == 1 else 'non-fraud'} transactions)"
        verdict, outcome = ((PROMOTE, "no champion yet: the first model is promoted without a measure")
                            if champion_scores is None else
                            (REJECT, "nothing shows the challenger is better: reject (the champion keeps serving)"))
        return Decision(verdict, f"the test transactions hold {what}: {metric} is undefined; {outcome}. "
                                 "Evaluate on a test period with both fraud and non-fraud transactions.",
                        metric=metric, challenger_value=None, champion_value=None,
                        min_improvement=float(min_improvement), n_transactions=len(labels))
    b = metrics.bootstrap(labels, scores, metric, n_boot, level, seed, thresholds)
    new = b.values["challenger"]
    common = dict(metric=metric, challenger_value=new, min_improvement=float(min_improvement), level=b.level,
                  n_boot=b.n_boot, n_transactions=b.n_rows, seed=b.seed,
                  challenger_interval=b.intervals["challenger"])
    if champion_scores is None:
        low, high = b.intervals["challenger"]
        return Decision(PROMOTE, f"no champion yet: the first model is promoted (challenger {metric} {new:.4f}, "
                                 f"{b.level * 100:g}% bootstrap interval [{low:.4f}, {high:.4f}] over "
                                 f"{b.n_rows:,} test transactions, {b.n_boot:,} resamples)",
                        champion_value=None, **common)
    old = b.values["champion"]
    low, high = b.delta_interval
    verdict = PROMOTE if low > min_improvement else REJECT
    rule = (f"lower bound > min_improvement {min_improvement:g}: promote" if verdict == PROMOTE
            else f"lower bound not > min_improvement {min_improvement:g}: reject")
    reason = (f"challenger {metric} {new:.4f} vs champion {old:.4f}: delta {b.delta:+.4f}, "
              f"{b.level * 100:g}% paired bootstrap interval [{low:+.4f}, {high:+.4f}] over {b.n_rows:,} test "
              f"transactions ({b.n_boot:,} resamples); {rule}")
    return Decision(verdict, reason, champion_value=old, delta=b.delta, delta_low=low, delta_high=high,
                    champion_interval=b.intervals["champion"], **common)
