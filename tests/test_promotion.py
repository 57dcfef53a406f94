"""Specification of the promotion rule (fraudlib.promotion): paired bootstrap of the delta."""

from __future__ import annotations

import numpy as np
import pytest

from fraudlib import metrics
from fraudlib.promotion import PROMOTE, REJECT, decide


def scored(n=6000, seed=0, fraud=0.05):
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < fraud).astype(int)
    base = labels * 0.8 + rng.normal(0, 1, n)
    return labels, base, rng


def test_first_model_is_promoted_without_a_champion_with_its_own_interval():
    labels, scores, _ = scored()
    d = decide(labels, scores, None)
    assert d.decision == PROMOTE and "first model" in d.reason
    assert d.metric == "auprc" and d.champion_value is None and d.delta is None
    low, high = d.challenger_interval
    assert d.challenger_value == pytest.approx(metrics.auprc(labels, scores))
    assert low < d.challenger_value < high and f"[{low:.4f}, {high:.4f}]" in d.reason


def test_an_identical_retrain_is_rejected_its_interval_is_exactly_zero():
    labels, scores, _ = scored()
    d = decide(labels, scores, scores.copy())
    assert d.decision == REJECT
    assert (d.delta, d.delta_low, d.delta_high) == (0.0, 0.0, 0.0)
    assert "[+0.0000, +0.0000]" in d.reason and "not > min_improvement 0" in d.reason


def test_a_test_period_with_one_class_rejects_the_challenger_and_says_why():
    _, scores, rng = scored()
    better = scores + 10.0
    for labels, said in ((np.zeros(scores.size, int), "non-fraud"), (np.ones(scores.size, int), "fraud")):
        d = decide(labels, better, scores)
        assert d.decision == REJECT
        assert f"one class only ({scores.size:,} {said} transactions)" in d.reason and "undefined" in d.reason
        assert d.delta is None and d.challenger_value is None
    # without a champion there is nothing to keep serving: the first model is still promoted
    assert decide(np.zeros(scores.size, int), scores, None).decision == PROMOTE


def test_a_clearly_better_challenger_is_promoted_and_the_reason_names_everything():
    labels, champion, rng = scored(n=24_607)
    challenger = champion + labels * 0.6 + rng.normal(0, 0.3, labels.size)
    d = decide(labels, challenger, champion)
    assert d.decision == PROMOTE and 0 < d.delta_low <= d.delta <= d.delta_high
    assert d.challenger_value == pytest.approx(metrics.auprc(labels, challenger))
    assert d.champion_value == pytest.approx(metrics.auprc(labels, champion))
    assert d.delta == pytest.approx(d.challenger_value - d.champion_value)
    expected = (f"challenger auprc {d.challenger_value:.4f} vs champion {d.champion_value:.4f}: "
                f"delta {d.delta:+.4f}, 95% paired bootstrap interval [{d.delta_low:+.4f}, {d.delta_high:+.4f}] "
                f"over 24,607 test transactions (1,000 resamples); lower bound > min_improvement 0: promote")
    assert d.reason == expected
    assert d.to_dict()["delta_low"] == d.delta_low and d.to_dict()["n_boot"] == 1000


def test_a_higher_point_estimate_inside_the_noise_is_rejected():
    # The old point rule promoted on any positive difference; the interval straddles 0 here.
    labels, champion, _ = scored(n=3000)
    seeds = [s for s in range(40) if metrics.auprc(labels, champion + np.random.default_rng(s).normal(
        0, 0.05, labels.size)) > metrics.auprc(labels, champion)]
    challenger = champion + np.random.default_rng(seeds[0]).normal(0, 0.05, labels.size)
    d = decide(labels, challenger, champion)
    assert d.delta > 0 and d.delta_low < 0 < d.delta_high
    assert d.decision == REJECT


def test_min_improvement_moves_the_bar_for_the_lower_bound():
    labels, champion, rng = scored(n=8000)
    challenger = champion + labels * 0.6 + rng.normal(0, 0.3, labels.size)
    low = decide(labels, challenger, champion, n_boot=300).delta_low
    assert low > 0.05
    assert decide(labels, challenger, champion, n_boot=300, min_improvement=low - 1e-4).decision == PROMOTE
    d = decide(labels, challenger, champion, n_boot=300, min_improvement=low + 1e-4)
    assert d.decision == REJECT and f"min_improvement {low + 1e-4:g}" in d.reason
    # A negative min_improvement lets a challenger no worse than the champion (within it) replace it.
    labels, scores, _ = scored()
    assert decide(labels, scores, scores, n_boot=300, min_improvement=-0.01).decision == PROMOTE


def test_the_promotion_metric_decides():
    # The challenger ranks the top better (AUPRC) but the bulk worse (ROC AUC).
    rng = np.random.default_rng(4)
    n = 10_000
    labels = (rng.random(n) < 0.05).astype(int)
    champion = labels * 1.0 + rng.normal(0, 1, n)
    challenger = np.where(labels == 1, np.where(rng.random(n) < 0.5, 5.0, -1.0), rng.normal(0, 1, n))
    by_auprc = decide(labels, challenger, champion, metric="auprc", n_boot=300)
    by_auc = decide(labels, challenger, champion, metric="roc_auc", n_boot=300)
    assert by_auprc.decision == PROMOTE and by_auc.decision == REJECT
    assert by_auc.metric == "roc_auc" and "roc_auc" in by_auc.reason
    assert by_auc.challenger_value == pytest.approx(metrics.roc_auc(labels, challenger))


def test_threshold_metrics_are_taken_at_each_models_own_threshold():
    labels, champion, rng = scored(n=10_000)
    challenger = champion / 10  # same ranking, different scale: same F1 at each own F1-max threshold
    t_champion = metrics.choose_threshold(labels, champion)
    t_challenger = metrics.choose_threshold(labels, challenger)
    d = decide(labels, challenger, champion, metric="f1",
               challenger_threshold=t_challenger, champion_threshold=t_champion)
    assert d.delta == pytest.approx(0.0) and d.decision == REJECT
    assert d.challenger_value == pytest.approx(metrics.at_threshold(labels, challenger, t_challenger)["f1"])
    # At one shared threshold of 0.5 the rescaled challenger would flag almost nothing.
    shared = decide(labels, challenger, champion, metric="f1", challenger_threshold=0.5, champion_threshold=0.5)
    assert shared.delta < -0.1
    with pytest.raises(ValueError, match="operating threshold of the champion"):
        decide(labels, challenger, champion, metric="f1", challenger_threshold=0.5)


def test_bootstrap_samples_level_and_seed_change_the_interval_as_named():
    labels, champion, rng = scored(n=5000)
    challenger = champion + labels * 0.2 + rng.normal(0, 0.3, labels.size)
    base = decide(labels, challenger, champion, n_boot=200)
    assert base.n_boot == 200 and "(200 resamples)" in base.reason
    assert decide(labels, challenger, champion, n_boot=200) == base  # seeded: repeatable
    other_seed = decide(labels, challenger, champion, n_boot=200, seed=7)
    assert other_seed.seed == 7 and (other_seed.delta_low, other_seed.delta_high) != (base.delta_low, base.delta_high)
    assert other_seed.delta == base.delta  # the point estimate does not depend on the resamples
    more = decide(labels, challenger, champion, n_boot=400)
    assert more.n_boot == 400 and "(400 resamples)" in more.reason and more.delta_low != base.delta_low
    wide = decide(labels, challenger, champion, n_boot=200, level=0.99)
    narrow = decide(labels, challenger, champion, n_boot=200, level=0.5)
    assert wide.delta_low < base.delta_low < narrow.delta_low < narrow.delta_high < base.delta_high < wide.delta_high
    assert "99% paired bootstrap interval" in wide.reason and wide.level == 0.99


@pytest.mark.parametrize("kwargs, error, message", [
    ({"metric": "recall_at_k"}, KeyError, "'recall_at_k'"),
    ({"metric": "accuracy"}, KeyError, "'accuracy'"),
    ({"metric": "alert_rate"}, KeyError, "'alert_rate'"),
    ({"n_boot": 0}, ValueError, "bootstrap_samples"),
    ({"level": 1.0}, ValueError, "confidence_level"),
    ({"seed": -1}, ValueError, "bootstrap_seed"),
    ({"min_improvement": float("nan")}, ValueError, "min_improvement"),
])
def test_invalid_settings_are_named_in_the_error(kwargs, error, message):
    labels, scores, _ = scored(n=500)
    with pytest.raises(error, match=message):
        decide(labels, scores, None, **kwargs)


def test_bootstrap_of_25k_transactions_and_1000_resamples_takes_seconds_not_minutes():
    import time

    labels, champion, rng = scored(n=25_000, fraud=0.02)
    challenger = champion + rng.normal(0, 0.1, labels.size)
    start = time.perf_counter()
    decide(labels, challenger, champion, n_boot=1000)
    assert time.perf_counter() - start < 20  # ~1.5 s here; sklearn per resample took ~10 s
