"""The promotion rule, and the statistics that explain a decision.

A challenger replaces the champion when it is better on the promotion metric by more than
``min_improvement``; the first model of a project is promoted because there is nothing
to compare it with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

PROMOTE = "promote"
REJECT = "reject"


@dataclass(frozen=True)
class Decision:
    decision: str  # PROMOTE or REJECT
    reason: str
    metric: str
    challenger_value: float
    champion_value: float | None
    min_improvement: float

    def to_dict(self) -> dict:
        return asdict(self)


def decide(challenger: dict[str, float], champion: dict[str, float] | None,
           metric: str = "f1", min_improvement: float = 0.0) -> Decision:
    """Promote when ``challenger[metric] > champion[metric] + min_improvement``."""
    if metric not in challenger:
        raise KeyError(f"promotion metric {metric!r} is not among the challenger's metrics "
                       f"({', '.join(sorted(challenger))})")
    new = float(challenger[metric])
    if champion is None:
        return Decision(PROMOTE, "no champion yet: the first model is promoted",
                        metric, new, None, min_improvement)
    old = float(champion[metric])
    if new > old + min_improvement:
        verdict, relation = PROMOTE, "beats"
    else:
        verdict, relation = REJECT, "does not beat"
    reason = (f"challenger {metric} {new:.4f} {relation} champion {old:.4f} "
              f"+ min_improvement {min_improvement:g}")
    return Decision(verdict, reason, metric, new, old, min_improvement)


def bootstrap_delta_ci(labels: np.ndarray, challenger_scores: np.ndarray, champion_scores: np.ndarray,
                       metric_fn: Callable[[np.ndarray, np.ndarray], float], n_boot: int = 500,
                       level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(delta, low, high): paired bootstrap over edges of metric(challenger) - metric(champion)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    n = len(labels)
    delta = metric_fn(labels, challenger_scores) - metric_fn(labels, champion_scores)
    deltas = np.empty(n_boot)
    for i in range(n_boot):
        idx = rng.integers(0, n, n)
        deltas[i] = metric_fn(labels[idx], challenger_scores[idx]) - metric_fn(labels[idx], champion_scores[idx])
    alpha = (1 - level) / 2
    low, high = np.quantile(deltas, [alpha, 1 - alpha])
    return float(delta), float(low), float(high)
