"""Rolling windows of months relative to ``as_of`` (fraudlib.preprocess), from a CSV or the store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fraudlib import features, graph_store, store
from fraudlib.preprocess import preprocess, read_test_rows, with_causal_features
from fraudlib.tabformer import read_transactions

# The 30,000-row synthetic file has fraud in 2016, 2018 and 2019 only.
WINDOWS = dict(as_of="2020-01", train_months=24, val_months=12, test_months=12)


def month_of(frame: pd.DataFrame) -> pd.Series:
    return frame["Year"].astype(int).astype(str) + "-" + frame["Month"].astype(int).map("{:02d}".format)


@pytest.fixture(scope="module")
def window_dir(synthetic_csv, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("window") / "graph"
    preprocess(synthetic_csv, out, **WINDOWS)
    return out


def test_the_windows_are_the_months_before_as_of_newest_for_test(window_dir):
    manifest = graph_store.read_manifest(window_dir)
    assert manifest["windows"] == {"as_of": "2020-01", "train": ["2016-01", "2017-12"],
                                   "validation": ["2018-01", "2018-12"], "test": ["2019-01", "2019-12"]}
    assert manifest["split_rule"]["test"] == "2019-01 .. 2019-12"
    test = read_test_rows(window_dir)
    assert set(month_of(test)) <= {f"2019-{m:02d}" for m in range(1, 13)} and len(test) == manifest["splits"]["test"]["edges"]
    assert {y: v["split"] for y, v in manifest["years"].items()} == {
        "2016": "train", "2017": "train", "2018": "validation", "2019": "test"}


def test_rows_from_as_of_on_are_not_read_and_older_ones_feed_only_the_features(window_dir, synthetic_csv):
    manifest = graph_store.read_manifest(window_dir)
    full = read_transactions(synthetic_csv)
    before = full[(full["Year"] * 12 + full["Month"]) < 2020 * 12 + 1]
    assert manifest["rows"]["read"] == len(before)
    assert manifest["rows"]["fraud"] == int(before[before["Year"] >= 2016]["Is Fraud?"].sum())
    history = pd.read_parquet(window_dir / "history.parquet")
    first = features.minutes(2019, 1, 1, 0) - features.history_days(60) * features.DAY
    assert history["minute"].min() >= first and history["minute"].max() < features.minutes(2020, 1, 1, 0)


def test_the_saved_history_serves_rows_from_the_test_window_on(window_dir):
    encoders = json.loads((window_dir / graph_store.ENCODERS).read_text())
    rows = read_test_rows(window_dir)
    batch = rows[list(features.NAMES)].to_numpy()
    again = with_causal_features(rows.drop(columns=list(features.NAMES)), window_dir, encoders)
    np.testing.assert_allclose(again[list(features.NAMES)].to_numpy(), batch, rtol=1e-5, atol=1e-5)
    older = rows.head(1).drop(columns=list(features.NAMES)).assign(Year=2018, Month=12)
    with pytest.raises(ValueError, match="is before 2019-01-01"):
        with_causal_features(older, window_dir, encoders)


def test_the_store_gives_the_same_windows_as_the_csv(synthetic_csv, window_dir, tmp_path):
    root = tmp_path / "store"
    store.ingest(synthetic_csv, root, all_months=True)
    out = tmp_path / "graph"
    summary = preprocess(root, out, **WINDOWS)
    manifest, csv_manifest = graph_store.read_manifest(out), graph_store.read_manifest(window_dir)
    assert manifest["source"]["store_months"][-1] == "2020-02" and manifest["source"]["xxh3_128"]
    assert summary.windows == csv_manifest["windows"]
    for key in ("rows", "windows", "dims"):
        assert manifest[key] == csv_manifest[key], key
    assert {s: v["fraud"] for s, v in manifest["splits"].items()} == {
        s: v["fraud"] for s, v in csv_manifest["splits"].items()}
    # The store's hash names the months read: a later month does not change it.
    assert manifest["source"]["xxh3_128"] == store.content_hash(root, before="2020-01") != store.content_hash(root)


@pytest.mark.parametrize("windows, message", [
    (dict(as_of="1991-01"), r"the test window 1990-12 has no transactions .* \(it holds 1991-02 .. 2020-02\)"),
    (dict(as_of="2017-06", train_months=12, val_months=2, test_months=3),
     r"the test window 2017-03 .. 2017-05 has no fraud among its [\d,]+ transactions.*test_months"),
    (dict(as_of="2020-01", train_months=12, val_months=12, test_months=12),
     r"the train window 2017-01 .. 2017-12 has no fraud.*train_months"),
    (dict(as_of="2019-13"), r"as_of '2019-13' is not a month written YYYY-MM"),
    (dict(as_of="2019-06", test_months=0), r"test_months must be an integer >= 1"),
])
def test_a_window_without_data_or_fraud_is_refused_before_anything_is_written(synthetic_csv, tmp_path, windows, message):
    out = tmp_path / "graph"
    with pytest.raises(ValueError, match=message):
        preprocess(synthetic_csv, out, **windows)
    assert not out.exists() and not list(tmp_path.iterdir())
