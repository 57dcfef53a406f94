import numpy as np
import pytest

from fraudlib.promotion import PROMOTE, REJECT, bootstrap_delta_ci, decide


def test_first_model_is_promoted_without_a_champion():
    d = decide({"f1": 0.1}, None)
    assert d.decision == PROMOTE and "first model" in d.reason


def test_challenger_must_beat_champion_by_more_than_min_improvement():
    assert decide({"f1": 0.60}, {"f1": 0.50}, min_improvement=0.05).decision == PROMOTE
    assert decide({"f1": 0.55}, {"f1": 0.50}, min_improvement=0.05).decision == REJECT
    assert decide({"f1": 0.50}, {"f1": 0.50}).decision == REJECT


def test_reason_names_metric_and_both_values():
    d = decide({"auprc": 0.8}, {"auprc": 0.9}, metric="auprc")
    assert d.decision == REJECT and "auprc" in d.reason and "0.8000" in d.reason and "0.9000" in d.reason


def test_unknown_promotion_metric_is_named_in_the_error():
    with pytest.raises(KeyError, match="'recall_at_k'"):
        decide({"f1": 0.5}, None, metric="recall_at_k")


def test_bootstrap_interval_contains_the_delta_and_is_positive_for_a_clearly_better_model():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 2000)
    good = labels + rng.normal(0, 0.3, 2000)
    bad = rng.normal(0, 1, 2000)
    accuracy = lambda y, s: float(np.mean((s > 0.5) == y))
    delta, low, high = bootstrap_delta_ci(labels, good, bad, accuracy, n_boot=200)
    assert low <= delta <= high
    assert low > 0
