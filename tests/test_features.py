"""Causal features: each row's features come from strictly earlier rows only, and equal a
direct (slow) computation of their definitions."""

import numpy as np
import pandas as pd
import pytest

from fraudlib import features
from fraudlib.features import DAY, NAMES, Stream, compute


def random_stream(n=600, cards=12, merchants=15, days=900, seed=0) -> Stream:
    rng = np.random.default_rng(seed)
    minute = rng.integers(0, days * DAY, n) // 7 * 7 + 20_000 * DAY  # some rows share a minute
    return Stream(card=rng.integers(0, cards, n) * 10 + 3, merchant=rng.integers(-2**62, -2**62 + merchants, n),
                  minute=minute.astype(np.int64), amount=np.round(rng.lognormal(3, 1, n) * rng.choice([1, -1], n, p=[.95, .05]), 2),
                  fraud=(rng.random(n) < 0.1).astype(np.int8))


def direct(s: Stream, i: int, delay: int) -> dict:
    """The definitions, row by row."""
    t = s.minute[i]
    earlier = s.minute < t
    card, merchant = s.card == s.card[i], s.merchant == s.merchant[i]
    def window(mask, days, end=0):
        return mask & (s.minute >= t - days * DAY) & (s.minute < t - end * DAY)
    def first_visit(j):
        pair = (s.card == s.card[j]) & (s.merchant == s.merchant[j])
        return not (pair & (s.minute < s.minute[j]) & (s.minute >= s.minute[j] - features.NOVELTY_DAYS * DAY)).any()
    out = {}
    for d in features.WINDOWS_DAYS:
        out[f"card_tx_{d}d"] = np.log1p(window(card, d).sum())
        out[f"merchant_tx_{d}d"] = np.log1p(window(merchant, d).sum())
    for d in (1, 7):
        out[f"card_new_merchants_{d}d"] = np.log1p(sum(first_visit(j) for j in np.flatnonzero(window(card, d))))
        out[f"merchant_new_cards_{d}d"] = np.log1p(sum(first_visit(j) for j in np.flatnonzero(window(merchant, d))))
    week = sum(first_visit(j) for j in np.flatnonzero(window(merchant, 7)))
    usual = sum(first_visit(j) for j in np.flatnonzero(window(merchant, features.BASELINE_DAYS + 7, 7))) * 7 / features.BASELINE_DAYS
    out["merchant_new_cards_vs_usual"] = np.log((week + 1) / (usual + 1))
    horizon = features.history_days(delay)
    prev = s.minute[card & earlier & (s.minute >= t - horizon * DAY)]
    out["card_hours_since_last"] = np.log1p(((t - prev.max()) if prev.size else horizon * DAY) / 60)
    prev = s.minute[card & merchant & earlier & (s.minute >= t - features.NOVELTY_DAYS * DAY)]
    out["pair_first_visit"] = float(prev.size == 0)
    out["pair_days_since_last"] = np.log1p(((t - prev.max()) if prev.size else features.NOVELTY_DAYS * DAY) / DAY)
    prev = s.minute[window(merchant, horizon)]
    out["merchant_days_active"] = np.log1p(((t - prev.min()) if prev.size else 0) / DAY)
    la = np.rint(np.sign(s.amount) * np.log1p(np.abs(s.amount)) * 4096) / 4096
    for name, mask in (("amount_vs_card", card), ("amount_vs_merchant", merchant)):
        past = la[window(mask, features.AMOUNT_DAYS)]
        out[name] = (la[i] - past.mean()) / (past.std() + 0.25) if past.size else 0.0
    known = window(merchant, delay + features.LABEL_WINDOW_DAYS, delay) & (s.fraud >= 0)
    f = (s.fraud[known] == 1).sum()
    out["merchant_known_frauds"] = np.log1p(f)
    out["merchant_fraud_rate"] = (f + features.PRIOR_RATE * features.PRIOR_WEIGHT) / (known.sum() + features.PRIOR_WEIGHT)
    out["card_known_frauds"] = np.log1p((s.fraud[window(card, delay + features.LABEL_WINDOW_DAYS, delay)] == 1).sum())
    return out


@pytest.mark.parametrize("delay", [0, 60])
def test_features_equal_their_definitions_computed_row_by_row(delay):
    s = random_stream()
    rows = np.arange(0, len(s), 7)
    got = compute(s, rows, label_delay_days=delay)
    expected = np.array([[direct(s, i, delay)[name] for name in NAMES] for i in rows], dtype=np.float32)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grouping", features.GROUPINGS)
def test_one_groupings_features_alone_are_the_same_values_and_the_others_are_left_zero(grouping):
    s = random_stream(seed=3)
    rows = np.arange(0, len(s), 5)
    mine = np.array([features.GROUPING_OF[name] == grouping for name in NAMES])

    got = compute(s, rows, 60, groupings=(grouping,))

    np.testing.assert_array_equal(got[:, mine], compute(s, rows, 60)[:, mine])
    assert not got[:, ~mine].any() and mine.any() and (~mine).any()
    with pytest.raises(ValueError, match="groupings must be some of"):
        compute(s, rows, 60, groupings=("pair",))


def test_a_rows_features_never_depend_on_later_rows_or_its_own_label():
    s = random_stream(seed=1)
    cut = np.quantile(s.minute, 0.6)
    rows = np.flatnonzero(s.minute < cut)
    full = compute(s, rows)
    later = s.minute >= cut
    changed = Stream(s.card, s.merchant, s.minute, np.where(later, 1.0, s.amount), np.where(later, 1, s.fraud).astype(np.int8))
    np.testing.assert_array_equal(compute(changed, rows), full)  # exactly: integer prefix sums
    i = rows[len(rows) // 2]
    own = s.fraud.copy()
    own[i] = 1 - own[i]
    np.testing.assert_array_equal(compute(Stream(s.card, s.merchant, s.minute, s.amount, own), [i]), full[[len(rows) // 2]])


def test_labels_younger_than_the_delay_are_not_used():
    s = random_stream(seed=2)
    i = int(np.argmax(s.minute))
    young = s.minute > s.minute[i] - 60 * DAY
    flipped = Stream(s.card, s.merchant, s.minute, s.amount, np.where(young, 1 - s.fraud, s.fraud).astype(np.int8))
    np.testing.assert_array_equal(compute(flipped, [i], 60), compute(s, [i], 60))
    assert not np.array_equal(compute(flipped, [i], 0), compute(s, [i], 0))


def test_new_rows_get_the_batch_features_from_the_saved_history_whatever_its_order():
    s = random_stream(seed=3, n=900, days=1200)
    since = int(np.quantile(s.minute, 0.8))
    rows = np.flatnonzero(s.minute >= since)
    hist = features.history(s, since, 60)
    assert len(hist) < len(s)  # bounded: older rows are not kept
    shuffled = hist.take(np.random.default_rng(0).permutation(len(hist)))
    # The history holds these rows already (same card, merchant, minute, amount): counted once.
    got = features.for_new_rows(shuffled, s.take(rows[::-1]), 60)[::-1]
    np.testing.assert_allclose(got, compute(s, rows, 60), rtol=1e-6, atol=1e-6)


def test_a_few_new_rows_get_their_batch_features_from_their_own_cards_and_merchants_rows():
    s = random_stream(seed=5, n=4000, cards=80, merchants=120, days=1200)
    since = int(np.quantile(s.minute, 0.8))
    rows = np.flatnonzero(s.minute >= since)[[3, 40, 77]]
    hist = features.history(s, since, 60)
    related = np.isin(hist.card, s.card[rows]) | np.isin(hist.merchant, s.merchant[rows])
    assert related.mean() < 0.25  # most of the history is about other cards and merchants
    np.testing.assert_allclose(features.for_new_rows(hist, s.take(rows), 60), compute(s, rows, 60),
                               rtol=1e-6, atol=1e-6)


def test_the_history_reaches_back_far_enough_for_the_first_visits_counted_in_every_window():
    """A revisit inside the merchant's baseline window whose first visit was 360 days before
    it: a history cut at the windows' own length would count it as a first visit."""
    t = 30_000 * DAY
    minute = np.array([t - 450 * DAY, t - 90 * DAY, t])  # first visit, revisit, the row to score
    s = Stream(card=np.array([1, 1, 2]), merchant=np.array([5, 5, 5]), minute=minute,
               amount=np.array([10.0, 10.0, 10.0]), fraud=np.array([0, 0, -1], np.int8))
    hist = features.history(s, t, 60)
    assert len(hist) == 3  # the first visit is within the history
    got = dict(zip(NAMES, features.for_new_rows(hist.take(np.array([0, 1])), s.take(np.array([2])), 60)[0]))
    assert got["merchant_new_cards_vs_usual"] == pytest.approx(np.log(1 / 1))  # no new card, none usual
    np.testing.assert_allclose(features.for_new_rows(hist.take(np.array([0, 1])), s.take(np.array([2])), 60),
                               compute(s, [2], 60))


def test_rows_after_the_history_see_it_and_each_other():
    s = random_stream(seed=4, n=700)
    since = int(np.quantile(s.minute, 0.7))
    old, new = np.flatnonzero(s.minute < since), np.flatnonzero(s.minute >= since)
    got = features.for_new_rows(s.take(old), s.take(new), 0)
    expected = compute(Stream(s.card, s.merchant, s.minute, s.amount, np.where(s.minute >= since, -1, s.fraud).astype(np.int8)), new, 0)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_minutes_count_from_1970_in_calendar_days():
    m = features.minutes(np.array([1970, 2020]), np.array([1, 3]), np.array([1, 1]), np.array([0, 61]))
    assert m[0] == 0
    assert m[1] == (pd.Timestamp("2020-03-01 01:01") - pd.Timestamp("1970-01-01")).total_seconds() // 60


def test_a_negative_label_delay_is_refused():
    with pytest.raises(ValueError, match="label_delay_days"):
        compute(random_stream(n=10), label_delay_days=-1)


def test_a_card_and_merchant_never_seen_before_get_empty_windows_and_a_first_visit():
    s = random_stream(seed=5)
    newcomer = Stream(np.array([999_999]), np.array([7]), np.array([s.minute.max() + DAY]),
                      np.array([12.5]), np.array([-1], np.int8))
    both = Stream.concat(s, newcomer)
    row = dict(zip(NAMES, compute(both, [len(s)], 60)[0]))
    assert row["pair_first_visit"] == 1.0 and row["card_tx_30d"] == 0 and row["merchant_tx_30d"] == 0
    assert row["card_hours_since_last"] == pytest.approx(np.log1p(features.history_days(60) * 24), rel=1e-6)
    assert row["amount_vs_card"] == 0 and row["merchant_known_frauds"] == 0
