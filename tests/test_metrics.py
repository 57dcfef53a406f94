"""Specification of fraudlib.metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

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
    assert m == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "accuracy": 6 / 8,
                               "alert_rate": 3 / 8})
    assert metrics.at_threshold([1], [0.5], 0.5)["recall"] == 1.0


def test_nothing_flagged_gives_zero_precision_recall_and_f1():
    m = metrics.at_threshold(LABELS, np.zeros(LABELS.size), 0.5)
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)


def test_choose_threshold_by_default_reaches_the_highest_f1_over_all_thresholds():
    threshold = metrics.choose_threshold(LABELS, SCORES)
    best = metrics.at_threshold(LABELS, SCORES, threshold)["f1"]
    assert best == pytest.approx(max(metrics.at_threshold(LABELS, SCORES, t)["f1"] for t in SCORES))
    assert best == pytest.approx(6 / 7)  # threshold 0.4: tp 3, fp 1
    assert threshold == 0.4


def test_choose_threshold_with_an_alert_rate_flags_that_fraction_of_the_transactions():
    rng = np.random.default_rng(3)
    scores = rng.random(10_000)
    labels = (rng.random(10_000) < 0.02).astype(int)
    for rate in (0.001, 0.01, 0.05, 0.5):
        threshold = metrics.choose_threshold(labels, scores, alert_rate=rate)
        assert metrics.at_threshold(labels, scores, threshold)["alert_rate"] == pytest.approx(rate)
    # It does not depend on the labels, unlike F1-max.
    assert metrics.choose_threshold(1 - labels, scores, alert_rate=0.01) == \
        metrics.choose_threshold(labels, scores, alert_rate=0.01)


def test_choose_threshold_with_an_alert_rate_never_flags_more_than_asked_when_scores_tie():
    scores = np.array([0.9, 0.8, 0.8, 0.8, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    labels = np.zeros(10, int)
    assert metrics.choose_threshold(labels, scores, alert_rate=0.2) == 0.9  # 0.8 would flag 4 of 10
    assert metrics.choose_threshold(labels, scores, alert_rate=0.4) == 0.8
    with pytest.raises(ValueError, match="highest score"):
        metrics.choose_threshold(labels, np.full(10, 0.5), alert_rate=0.3)


@pytest.mark.parametrize("rate", [0.0, 1.0, -0.1, 1.5, float("nan"), True])
def test_choose_threshold_rejects_an_alert_rate_outside_zero_one(rate):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        metrics.choose_threshold(LABELS, SCORES, alert_rate=rate)


def test_choose_threshold_errors_name_the_cause():
    with pytest.raises(ValueError, match="fewer than one of the 8"):
        metrics.choose_threshold(LABELS, SCORES, alert_rate=0.1)
    with pytest.raises(ValueError, match="no fraud"):
        metrics.choose_threshold([0, 0, 0], [0.1, 0.2, 0.3])


def test_report_has_metrics_at_half_and_at_the_given_threshold():
    r = metrics.report(LABELS, SCORES, 0.4)
    assert r["f1"] == pytest.approx(2 / 3) and r["f1_at_threshold"] == pytest.approx(6 / 7)
    assert r["alert_rate"] == pytest.approx(3 / 8) and r["alert_rate_at_threshold"] == pytest.approx(4 / 8)
    assert r["threshold"] == 0.4
    labels, scores = _tied_scores()  # both ranking metrics from one placing of the rows, as sklearn has them
    ranked = metrics.report(labels, scores, 0.5)
    assert ranked["auprc"] == pytest.approx(average_precision_score(labels, scores))
    assert ranked["roc_auc"] == pytest.approx(roc_auc_score(labels, scores))
    assert set(r) == {"auprc", "roc_auc", "threshold"} | {
        f"{m}{suffix}" for m in ("precision", "recall", "f1", "accuracy", "alert_rate")
        for suffix in ("", "_at_threshold")}


def _tied_scores(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.05).astype(int)
    return labels, np.round(labels * 0.3 + rng.random(n), 2)  # many ties


@pytest.mark.parametrize("metric", metrics.BOOTSTRAP_METRICS)
def test_a_resample_as_cell_weights_gives_the_metric_of_the_resampled_rows(metric):
    labels, scores = _tied_scores()
    other = np.round(scores + np.random.default_rng(3).normal(0, 0.2, scores.size), 2)  # a second model
    reference = {"auprc": average_precision_score, "roc_auc": roc_auc_score,
                 **{m: (lambda y, s, m=m: metrics.at_threshold(y, s, 0.8)[m]) for m in metrics.THRESHOLD_METRICS}}
    cells = metrics._Cells(labels, {"a": scores, "b": other}, metric, {"a": 0.8, "b": 0.8})
    assert cells.sizes.size < (labels == 0).sum()  # fewer cells than rows (far fewer at a natural fraud rate)
    rng = np.random.default_rng(5)
    for _ in range(4):  # a Poisson weight per row, summed per cell: the rows drawn that often
        weights = rng.poisson(1.0, labels.size)
        fraud, others = weights[labels == 1], weights[labels == 0]
        got = cells(np.bincount(cells.cell_of, weights=others, minlength=cells.sizes.size)[None, :],
                    fraud[None, :].astype(float))
        rows = np.repeat(np.arange(labels.size), weights)
        for name, s in (("a", scores), ("b", other)):
            assert got[name][0] == pytest.approx(reference[metric](labels[rows], s[rows]), abs=1e-12)
    assert metrics.metric_value(labels, scores, metric, 0.8) == pytest.approx(reference[metric](labels, scores))


def test_bootstrap_interval_contains_the_estimate_and_is_repeatable():
    labels, scores = _tied_scores(400)
    low, high = metrics.bootstrap_ci(labels, scores, "auprc", n_boot=200, seed=1)
    assert low < metrics.auprc(labels, scores) < high
    assert (low, high) == metrics.bootstrap_ci(labels, scores, "auprc", n_boot=200, seed=1)
    assert (low, high) != metrics.bootstrap_ci(labels, scores, "auprc", n_boot=200, seed=2)


def test_bootstrap_interval_widens_with_the_level_and_narrows_with_more_rows():
    labels, scores = _tied_scores(2000)
    narrow = metrics.bootstrap_ci(labels, scores, n_boot=300, level=0.5)
    wide = metrics.bootstrap_ci(labels, scores, n_boot=300, level=0.99)
    assert wide[0] < narrow[0] < narrow[1] < wide[1]
    big_labels, big_scores = _tied_scores(50_000)
    big = metrics.bootstrap_ci(big_labels, big_scores, n_boot=300)
    small = metrics.bootstrap_ci(labels, scores, n_boot=300)
    assert big[1] - big[0] < (small[1] - small[0]) / 2


def test_paired_bootstrap_of_identical_scores_is_exactly_zero():
    labels, scores = _tied_scores()
    b = metrics.bootstrap(labels, {"a": scores, "b": scores.copy()}, "auprc", n_boot=300)
    assert b.delta == 0.0 and b.delta_interval == (0.0, 0.0)
    assert b.intervals["a"] == b.intervals["b"] and b.n_boot == 300 and b.n_rows == labels.size


def test_paired_bootstrap_is_narrower_than_two_independent_intervals():
    # Two models that share most of their scores: pairing removes the common noise.
    labels, scores = _tied_scores(5000)
    rng = np.random.default_rng(9)
    other = scores + rng.normal(0, 0.02, scores.size)
    b = metrics.bootstrap(labels, {"a": scores, "b": other}, "auprc", n_boot=400)
    (a_low, a_high), (b_low, b_high) = b.intervals["a"], b.intervals["b"]
    assert b.delta_interval[1] - b.delta_interval[0] < ((a_high - a_low) + (b_high - b_low)) / 4
    assert b.delta_interval[0] <= b.delta <= b.delta_interval[1]


def test_bootstrap_drops_resamples_without_fraud_and_fails_when_the_metric_is_undefined():
    labels = np.zeros(200, int)
    labels[0] = 1  # most resamples of 200 rows draw the one fraud, some do not
    scores = np.linspace(0, 1, 200)
    b = metrics.bootstrap(labels, {"a": scores}, "auprc", n_boot=500)
    assert 250 < b.n_boot < 500
    with pytest.raises(ValueError, match="undefined"):
        metrics.bootstrap(np.zeros(10, int), {"a": np.arange(10.0)}, "auprc")
    with pytest.raises(KeyError, match="'accuracy'"):
        metrics.bootstrap(labels, {"a": scores}, "accuracy")
    with pytest.raises(ValueError, match="needs a threshold"):
        metrics.bootstrap(labels, {"a": scores}, "f1")


@pytest.mark.parametrize("labels, scores, message", [
    ([0, 1], [0.5], "length"),
    ([0, 2], [0.5, 0.5], "0 or 1"),
    ([0, 1], [0.5, float("nan")], "NaN"),
])
def test_invalid_inputs_are_rejected(labels, scores, message):
    with pytest.raises(ValueError, match=message):
        metrics.auprc(labels, scores)


def test_pr_points_are_the_precision_recall_curve_where_recall_moves():
    labels, scores = _tied_scores()
    precision, recall, area = metrics.pr_points(labels, scores)
    assert area == pytest.approx(average_precision_score(labels, scores))
    p, r, t = precision_recall_curve(labels, scores)
    at = np.searchsorted(t, np.unique(scores[labels == 1])[::-1])  # sklearn's points at the fraud scores
    assert np.array_equal(precision, p[at]) and np.array_equal(recall, r[at])
    assert recall[-1] == 1.0 and np.all(np.diff(recall) > 0)
