"""Specification of fraudlib.metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fraudlib import metrics

LABELS = np.array([0, 0, 0, 0, 1, 1, 0, 1])
SCORES = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.05, 0.9])


def test_perfect_ranking_has_auprc_and_roc_auc_one():
    assert metrics.auprc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert metrics.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0


def test_constant_scores_have_auprc_equal_to_the_fraud_rate():
    assert metrics.auprc(LABELS, np.full(LABELS.size, 0.5)) == pytest.approx(LABELS.mean())


def test_metrics_undefined_on_one_class_are_nan():
    assert math.isnan(metrics.roc_auc([0, 0, 0], [0.1, 0.2, 0.3]))
    assert math.isnan(metrics.auprc([0, 0, 0], [0.1, 0.2, 0.3]))


def test_threshold_metrics_count_scores_at_or_above_the_threshold_as_fraud():
    # Flagged at 0.5: scores 0.6 (no), 0.7 (yes), 0.9 (yes) -> tp 2, fp 1, fn 1 (0.4).
    m = metrics.at_threshold(LABELS, SCORES, 0.5)
    assert m == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "accuracy": 6 / 8})
    assert metrics.at_threshold([1], [0.5], 0.5)["recall"] == 1.0


def test_nothing_flagged_gives_zero_precision_recall_and_f1():
    m = metrics.at_threshold(LABELS, np.zeros(LABELS.size), 0.5)
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)


def test_best_f1_threshold_reaches_the_highest_f1_over_all_thresholds():
    threshold = metrics.best_f1_threshold(LABELS, SCORES)
    best = metrics.at_threshold(LABELS, SCORES, threshold)["f1"]
    assert best == pytest.approx(max(metrics.at_threshold(LABELS, SCORES, t)["f1"] for t in SCORES))
    assert best == pytest.approx(6 / 7)  # threshold 0.4: tp 3, fp 1


def test_report_has_metrics_at_half_and_at_the_given_threshold():
    r = metrics.report(LABELS, SCORES, 0.4)
    assert r["f1"] == pytest.approx(2 / 3) and r["f1_at_threshold"] == pytest.approx(6 / 7)
    assert r["threshold"] == 0.4
    assert set(r) == {"auprc", "roc_auc", "threshold"} | {
        f"{m}{suffix}" for m in ("precision", "recall", "f1", "accuracy") for suffix in ("", "_at_threshold")}


def test_bootstrap_interval_contains_the_estimate_and_is_repeatable():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    scores = labels * 0.3 + rng.random(400)
    low, high = metrics.bootstrap_ci(labels, scores, metrics.auprc, n_boot=200, seed=1)
    assert low < metrics.auprc(labels, scores) < high
    assert (low, high) == metrics.bootstrap_ci(labels, scores, metrics.auprc, n_boot=200, seed=1)


@pytest.mark.parametrize("labels, scores, message", [
    ([0, 1], [0.5], "length"),
    ([0, 2], [0.5, 0.5], "0 or 1"),
    ([0, 1], [0.5, float("nan")], "NaN"),
])
def test_invalid_inputs_are_rejected(labels, scores, message):
    with pytest.raises(ValueError, match=message):
        metrics.auprc(labels, scores)
