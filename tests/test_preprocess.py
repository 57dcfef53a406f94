"""The preprocess stage: blueprint parity, determinism, no leakage, atomic output."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fraudlib import backend, features, graph_store
from fraudlib import synthetic
from fraudlib.preprocess import (encode_graph, encode_transactions, preprocess, read_test_rows,
                                 with_causal_features)
from fraudlib.tabformer import TabFormerFormatError, read_transactions

NOMINAL = ["Errors?", "Card", "Use Chip", "Merchant City", "Zip", "MCC", "Merchant Name"]


def blueprint_rows(raw: Path, fraud_ratio=0.1, under_sample=True, seed=42) -> pd.DataFrame:
    """The blueprint's row selection, ported literally to pandas (its index = file row)."""
    data = pd.read_csv(raw, dtype={"Merchant Name": "int64"}, keep_default_na=False, na_values=[""])
    data["Merchant State"] = data["Merchant State"].fillna("XX")
    data["Errors?"] = data["Errors?"].fillna("XX").str.replace(",", "")
    data["Zip"] = data["Zip"].fillna(0)
    data["Amount"] = data["Amount"].str.replace("$", "").astype(float)
    data["Is Fraud?"] = data["Is Fraud?"].map({"No": 0, "Yes": 1})
    data["Card"] = data["User"] * (data["Card"].max() + 1) + data["Card"]
    fraud = data[data["Is Fraud?"] == 1]
    data = pd.concat([data[data["Is Fraud?"] == 0].drop_duplicates(subset=NOMINAL), fraud])
    if under_sample:
        fraud_df, non_fraud_df = data[data["Is Fraud?"] == 1], data[data["Is Fraud?"] == 0]
        n = min(len(data) - len(fraud_df), int(len(fraud_df) / fraud_ratio))
        data = pd.concat([fraud_df, non_fraud_df.sample(n, random_state=seed)])
    return data.sample(frac=1, random_state=seed)


@pytest.fixture(scope="module")
def graph_dir(synthetic_csv, tmp_path_factory) -> Path:
    """The blueprint's features (parity); ``causal_dir`` adds the causal ones."""
    out = tmp_path_factory.mktemp("graph") / "graph"
    preprocess(synthetic_csv, out, feature_set="blueprint", deduplicate=True, undersample_test=True)
    return out


@pytest.fixture(scope="module")
def causal_dir(synthetic_csv, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("causal") / "graph"
    preprocess(synthetic_csv, out, deduplicate=True, undersample_test=True)  # the default feature set, the blueprint's rows
    return out


@pytest.fixture(scope="module")
def reference(synthetic_csv) -> pd.DataFrame:
    return blueprint_rows(synthetic_csv)


def test_same_rows_and_edge_order_as_the_blueprint(graph_dir, reference, synthetic_csv):
    raw = pd.read_csv(synthetic_csv, dtype={"Merchant Name": "int64"})
    cards = np.unique(raw["User"] * (raw["Card"].max() + 1) + raw["Card"])
    merchants = np.unique(raw["Merchant Name"])
    year = reference["Year"].to_numpy()
    expected = {"train": reference[year <= 2018].sort_values("Year", key=lambda y: y == 2018, kind="stable"),
                "test": reference[year > 2018]}

    for part, rows in expected.items():
        graph = graph_store.read_part(graph_dir, part)
        assert np.array_equal(graph.edge_index[0], np.searchsorted(cards, rows["Card"]))
        assert np.array_equal(graph.edge_index[1], np.searchsorted(merchants, rows["Merchant Name"]))
        assert np.array_equal(graph.label, rows["Is Fraud?"])
        assert graph.split.tolist() == np.where(rows["Year"] < 2018, "train",
                                                np.where(rows["Year"] == 2018, "validation", "test")).tolist()


def test_all_fraud_kept_and_non_fraud_undersampled_to_the_ratio(graph_dir, synthetic_csv):
    manifest = graph_store.read_manifest(graph_dir)
    raw = read_transactions(synthetic_csv)
    fraud = int(raw["Is Fraud?"].sum())
    kept_fraud = sum(s["fraud"] for s in manifest["splits"].values())
    kept = sum(s["edges"] for s in manifest["splits"].values())

    assert kept_fraud == manifest["rows"]["fraud"] == fraud
    assert kept - kept_fraud == manifest["rows"]["non_fraud_kept"] == int(fraud / 0.1)
    assert manifest["parameters"]["fraud_ratio_means"].startswith("fraud / non-fraud")


def test_without_undersampling_every_unique_non_fraud_row_is_kept(synthetic_csv, tmp_path):
    summary = preprocess(synthetic_csv, tmp_path / "graph", under_sample=False, deduplicate=True, undersample_test=True)

    assert summary.non_fraud_kept == summary.non_fraud_unique == \
        (blueprint_rows(synthetic_csv, under_sample=False)["Is Fraud?"] == 0).sum()
    assert sum(summary.fraud_edges.values()) == summary.fraud_rows


@pytest.mark.parametrize("fixture", ["graph_dir", "causal_dir"])  # both feature sets
def test_degrees_count_every_edge_of_both_parts_from_the_edge_index_alone(fixture, request):
    from fraudlib import graph_store
    from fraudlib.preprocess import degrees

    graph_dir = request.getfixturevalue(fixture)
    parts = [graph_store.read_part(graph_dir, p) for p in ("train", "test")]
    for name, graph in zip(("train", "test"), parts):
        np.testing.assert_array_equal(graph_store.read_edge_index(graph_dir, name), graph.edge_index)
    index = np.hstack([g.edge_index for g in parts])
    got = degrees(graph_dir)
    np.testing.assert_array_equal(got["user"], np.bincount(index[0], minlength=parts[0].x_user.shape[0]))
    np.testing.assert_array_equal(got["merchant"], np.bincount(index[1], minlength=parts[0].x_merchant.shape[0]))


def test_split_is_by_year(graph_dir):
    years = graph_store.read_manifest(graph_dir)["years"]

    for year, row in years.items():
        want = "train" if int(year) < 2018 else "validation" if int(year) == 2018 else "test"
        assert row["split"] == want
    assert {"train", "validation", "test"} <= {row["split"] for row in years.values()}


def test_feature_dimensions_follow_the_cardinalities(graph_dir, synthetic_csv, reference):
    raw = pd.read_csv(synthetic_csv, dtype={"Merchant Name": "int64"})
    train = reference[reference["Year"] < 2018]
    bits = lambda n: int(n).bit_length()  # noqa: E731  (BinaryEncoder: ordinals 1..n)
    binary_or_onehot = lambda n: n if n <= 8 else bits(n)  # noqa: E731
    edge_dim = sum(binary_or_onehot(train[c].nunique())
                   for c in ("Errors?", "Merchant City", "Zip", "Use Chip")) + 1

    dims = graph_store.read_manifest(graph_dir)["dims"]
    assert dims["user"] == bits((raw["User"] * (raw["Card"].max() + 1) + raw["Card"]).nunique())
    assert dims["merchant"] == bits(raw["Merchant Name"].nunique()) + bits(raw["MCC"].nunique())
    assert dims["edge"] == edge_dim
    test = graph_store.read_part(graph_dir, "test")
    assert (test.x_user.shape[1], test.x_merchant.shape[1], test.edge_attr.shape[1]) == \
        (dims["user"], dims["merchant"], dims["edge"])


def test_edge_encoders_are_fitted_on_train_rows_only(graph_dir, reference):
    encoders = graph_store.read_encoders(graph_dir)
    train = reference[reference["Year"] < 2018]
    by_column = {e["column"]: e for e in encoders["edge"]}

    assert by_column["Merchant City"]["categories"] == sorted(train["Merchant City"].unique())
    assert by_column["Zip"]["categories"] == sorted(train["Zip"].unique())
    assert by_column["Use Chip"]["categories"] == sorted(train["Use Chip"].unique())
    q25, median, q75 = np.percentile(train["Amount"], [25, 50, 75])
    assert by_column["Amount"]["center"] == pytest.approx(median)
    assert by_column["Amount"]["scale"] == pytest.approx(q75 - q25)


def test_a_city_seen_only_in_test_rows_is_unknown_to_the_encoders(synthetic_csv, write_tabformer, tmp_path):
    lines = synthetic_csv.read_text().splitlines()[1:]
    lines += ["0,0,2019,5,1,10:00,$10.00,Chip Transaction,77,Testville,TX,75001.0,5411,,Yes"] * 3
    preprocess(write_tabformer(lines), tmp_path / "graph")

    encoders = graph_store.read_encoders(tmp_path / "graph")
    test = graph_store.read_part(tmp_path / "graph", "test")
    city = next(e for e in encoders["edge"] if e["column"] == "Merchant City")
    assert "Testville" not in city["categories"] and 75001.0 not in encoders["edge"][2]["categories"]
    new_merchant = np.searchsorted(encoders["merchant"]["categories"], 77)
    rows = test.edge_index[1] == new_merchant
    city_bits = [i for i, n in enumerate(test.edge_features) if n.startswith(("City_", "Zip_"))]
    assert rows.sum() == 3 and not test.edge_attr[np.ix_(rows, city_bits)].any()


def test_encode_transactions_reproduces_the_test_edges_from_raw_rows(graph_dir, reference, synthetic_csv):
    rows = reference.index[reference["Year"] > 2018]
    frame = read_transactions(synthetic_csv).iloc[rows]

    users, merchants, attr = encode_transactions(frame, graph_store.read_encoders(graph_dir))

    test = graph_store.read_part(graph_dir, "test")
    assert np.array_equal(users, test.edge_index[0]) and np.array_equal(merchants, test.edge_index[1])
    np.testing.assert_allclose(attr, test.edge_attr, rtol=1e-6)


def test_the_test_edges_raw_rows_are_kept_and_encode_to_the_test_graph(graph_dir):
    rows = read_test_rows(graph_dir)
    graph, known = encode_graph(rows, graph_store.read_encoders(graph_dir))

    test = graph_store.read_part(graph_dir, "test")
    assert known.all() and len(rows) == test.num_edges
    assert np.array_equal(graph.edge_index, test.edge_index) and np.array_equal(graph.label, test.label)
    assert np.array_equal(graph.year, test.year) and np.array_equal(graph.x_user, test.x_user)
    np.testing.assert_allclose(graph.edge_attr, test.edge_attr, rtol=1e-6)


def test_test_rows_encode_with_another_preprocessings_encoders_dropping_rows_it_cannot_place(graph_dir, tmp_path):
    # Another file (fewer cards, so narrower codes) stands for the champion's preprocessing.
    synthetic.generate(tmp_path / "other.csv", 12_000, seed=0)
    other = preprocess(tmp_path / "other.csv", tmp_path / "other", feature_set="blueprint", deduplicate=True,
                       undersample_test=True)
    encoders = graph_store.read_encoders(tmp_path / "other")
    rows = read_test_rows(graph_dir)

    graph, known = encode_graph(rows, encoders)

    cards = rows["User"].to_numpy() * encoders["max_cards"] + rows["Card"].to_numpy()
    expected = np.isin(cards, encoders["user"]["categories"]) & np.isin(
        rows["Merchant Name"].to_numpy(), encoders["merchant"]["categories"])
    assert np.array_equal(known, expected) and 0 < known.sum() < len(rows)
    assert other.dims != graph_store.read_manifest(graph_dir)["dims"]
    assert graph.x_user.shape[1] == other.dims["user"] and graph.x_merchant.shape[1] == other.dims["merchant"]
    assert graph.edge_attr.shape == (known.sum(), other.dims["edge"])
    assert np.array_equal(np.asarray(encoders["user"]["categories"])[graph.edge_index[0]], cards[known])
    assert np.array_equal(graph.label, rows["Is Fraud?"].to_numpy().astype(np.int64)[known])


def test_a_graph_preprocessed_before_raw_test_rows_were_kept_says_to_preprocess_again(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the preprocess stage"):
        read_test_rows(tmp_path)


def test_unknown_values_encode_to_the_defined_unknown_code(graph_dir, synthetic_csv):
    encoders = graph_store.read_encoders(graph_dir)
    frame = read_transactions(synthetic_csv).head(1).astype({"Merchant City": object, "Use Chip": object,
                                                             "Merchant Name": "int64"})
    frame[["User", "Merchant Name", "Merchant City", "Use Chip"]] = [99_999, 123, "Atlantis", "Telepathy"]

    users, merchants, attr = encode_transactions(frame, encoders)

    names = graph_store.read_part(graph_dir, "test").edge_features
    city_or_chip = [i for i, n in enumerate(names) if n.startswith(("City_", "Chip_"))]
    assert users.tolist() == [-1] and merchants.tolist() == [-1]
    assert not attr[0, city_or_chip].any()


def test_default_test_part_is_every_transaction_of_the_test_period(synthetic_csv, tmp_path):
    raw = read_transactions(synthetic_csv, ["Year", "Is Fraud?"])
    test_period = raw[raw["Year"].to_numpy() > 2018]

    summary = preprocess(synthetic_csv, tmp_path / "graph")

    test = graph_store.read_part(tmp_path / "graph", "test")
    assert test.num_edges == summary.edges["test"] == len(test_period)  # no dedup, no draw
    assert int(test.label.sum()) == int(test_period["Is Fraud?"].sum())
    assert len(read_test_rows(tmp_path / "graph")) == len(test_period)
    # The periods before it are undersampled as before: 10 non-fraud per fraud.
    fraud_before = int(raw["Is Fraud?"].sum()) - int(test_period["Is Fraud?"].sum())
    kept_before = summary.edges["train"] + summary.edges["validation"]
    assert kept_before == fraud_before + int(fraud_before / 0.1)
    rows = graph_store.read_manifest(tmp_path / "graph")["rows"]
    assert rows["test_period_whole"] == len(test_period) and rows["non_fraud_kept"] == int(fraud_before / 0.1)


def test_the_blueprint_test_graph_is_the_test_periods_fraud_and_non_fraud_drawn_to_fraud_ratio(synthetic_csv,
                                                                                               tmp_path):
    preprocess(synthetic_csv, tmp_path / "graph", fraud_ratio=0.2)
    whole = graph_store.read_part(tmp_path / "graph", "test")
    (tmp_path / "graph" / graph_store.TEST_EDGES).unlink()  # read_part falls back to gnn/test_gnn (CSV)
    blueprint = graph_store.read_part(tmp_path / "graph", "test")

    fraud = int(whole.label.sum())
    assert int(blueprint.label.sum()) == fraud and blueprint.num_edges == fraud + int(fraud / 0.2)
    assert blueprint.num_edges < whole.num_edges
    # Its edges are edges of the whole period, with the same features, in the same order.
    rows = {tuple(e) + (float(a.sum()),): i for i, (e, a) in enumerate(zip(whole.edge_index.T, whole.edge_attr))}
    position = [rows[tuple(e) + (float(a.sum()),)] for e, a in zip(blueprint.edge_index.T, blueprint.edge_attr)]
    assert position == sorted(position)
    assert np.array_equal(whole.edge_attr[position], blueprint.edge_attr)
    assert np.array_equal(whole.label[position], blueprint.label) and set(blueprint.split) == {"test"}
    graphs = graph_store.read_manifest(tmp_path / "graph")["test_graphs"]
    assert graphs["gnn/test_gnn"]["edges"] == blueprint.num_edges
    assert graphs[graph_store.TEST_EDGES]["edges"] == whole.num_edges


def test_with_undersample_test_both_test_graphs_hold_the_same_edges(synthetic_csv, tmp_path):
    preprocess(synthetic_csv, tmp_path / "graph", undersample_test=True)
    parquet = graph_store.read_part(tmp_path / "graph", "test")
    (tmp_path / "graph" / graph_store.TEST_EDGES).unlink()
    csv = graph_store.read_part(tmp_path / "graph", "test")
    for field in ("edge_index", "edge_attr", "label", "year", "x_user", "x_merchant", "feature_mask_edge"):
        assert np.array_equal(getattr(parquet, field), getattr(csv, field)), field
    assert parquet.edge_features == csv.edge_features and list(parquet.split) == list(csv.split)


def test_same_seed_gives_byte_identical_output(synthetic_csv, tmp_path):
    first = preprocess(synthetic_csv, tmp_path / "a", seed=7)
    second = preprocess(synthetic_csv, tmp_path / "b", seed=7)
    other = preprocess(synthetic_csv, tmp_path / "c", seed=8)

    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 5 + 2 * 9  # with history.parquet and test_edges.parquet
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert first.manifest_hash == second.manifest_hash != other.manifest_hash


def test_manifest_records_source_counts_features_and_parameters(graph_dir, synthetic_csv):
    manifest = graph_store.read_manifest(graph_dir)
    summary_hash = hashlib.sha256((graph_dir / "manifest.json").read_bytes()).hexdigest()

    assert manifest["source"]["bytes"] == synthetic_csv.stat().st_size and manifest["source"]["xxh3_128"]
    assert manifest["parameters"] == {"fraud_ratio": 0.1, "under_sample": True, "seed": 42,
                                      "fraud_ratio_means": manifest["parameters"]["fraud_ratio_means"],
                                      "feature_set": "blueprint", "label_delay_days": 60, "deduplicate": True,
                                      "undersample_test": True, "as_of": "", "train_months": 12, "val_months": 1, "test_months": 1}
    windows = manifest["windows"]  # the months of the kept rows under the year split
    assert windows["as_of"] == "" and windows["train"][1] == "2017-12"
    assert windows["validation"] == ["2018-01", "2018-12"] and windows["test"] == ["2019-01", "2020-02"]
    assert manifest["causal_features"] == [] and manifest["history"] is None
    assert manifest["rows"]["read"] == 30_000
    assert {k: len(v) for k, v in manifest["features"].items()} == manifest["dims"]
    assert len(summary_hash) == 64


def test_feature_masks_give_one_group_per_original_column(graph_dir):
    graph = graph_store.read_part(graph_dir, "train")
    groups = {}
    for names, mask in ((graph.user_features, graph.feature_mask_user),
                        (graph.merchant_features, graph.feature_mask_merchant),
                        (graph.edge_features, graph.feature_mask_edge)):
        for name, group in zip(names, mask):
            groups.setdefault(name.split("_")[0], set()).add(int(group))

    assert all(len(g) == 1 for g in groups.values())
    assert sorted(g.pop() for g in groups.values()) == list(range(8))  # Card, Merchant, MCC + 5 edge columns
    assert list(groups) == ["Card", "Merchant", "MCC", "Errors", "City", "Zip", "Chip", "Amount"]


def test_bad_input_leaves_an_existing_output_untouched(write_tabformer, synthetic_csv, tmp_path):
    out = tmp_path / "graph"
    preprocess(synthetic_csv, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    lines = synthetic_csv.read_text().splitlines()[1:50]
    lines[30] = lines[30].replace("$", "$x", 1)

    with pytest.raises(TabFormerFormatError, match="line 32, column 'Amount'"):
        preprocess(write_tabformer(lines), out)

    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card_transaction.v1.csv", "graph"]


def test_failed_run_leaves_no_output_folder(write_tabformer, tmp_path):
    lines = ["0,0,2019,1,1,10:00,$1.00,Chip Transaction,1,A,B,1.0,5411,,Yes"]

    with pytest.raises(ValueError, match="no transactions before 2018"):
        preprocess(write_tabformer(lines), tmp_path / "graph")

    assert not (tmp_path / "graph").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["card_transaction.v1.csv"]


def test_undersampling_a_file_without_fraud_is_refused(write_tabformer, tmp_path):
    lines = ["0,0,2010,1,1,10:00,$1.00,Chip Transaction,1,A,B,1.0,5411,,No"]

    with pytest.raises(ValueError, match="no fraud rows.*under_sample=False"):
        preprocess(write_tabformer(lines), tmp_path / "graph")
    assert preprocess(write_tabformer(lines), tmp_path / "graph", under_sample=False).edges["train"] == 1


def test_rerun_replaces_an_existing_output(synthetic_csv, tmp_path):
    out = tmp_path / "graph"
    preprocess(synthetic_csv, out, seed=1)
    (out / "stale.txt").write_text("from an older run")

    summary = preprocess(synthetic_csv, out, seed=2)

    assert not (out / "stale.txt").exists()
    assert json.loads((out / "manifest.json").read_text())["parameters"]["seed"] == 2
    assert summary.graph_dir == str(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph"]


def test_rejects_a_non_positive_fraud_ratio(synthetic_csv, tmp_path):
    with pytest.raises(ValueError, match="fraud_ratio must be > 0"):
        preprocess(synthetic_csv, tmp_path / "graph", fraud_ratio=0)


# --- dataframe backend (fraudlib.backend) ----------------------------------------------------

def test_backend_is_pandas_without_a_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi

    assert not backend.gpu_available()
    assert backend.activate() == backend.Backend("pandas", "no GPU detected (nvidia-smi lists none)")
    assert backend.activate(prefer_gpu=False).name == "pandas"


def test_backend_with_a_fake_nvidia_smi_detects_the_gpu_and_falls_back_without_cudf(monkeypatch, tmp_path):
    # Test double: a script standing in for the driver's nvidia-smi (no GPU on this machine).
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    assert backend.gpu_available()
    choice = backend.activate()
    assert choice.name == "pandas" and "cuDF is not installed" in choice.reason
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not backend.gpu_available()


# --- the causal feature set (the default) ---------------------------------------------------

def test_causal_features_follow_the_blueprint_features_and_are_named_in_the_manifest(graph_dir, causal_dir):
    blueprint, causal = graph_store.read_manifest(graph_dir), graph_store.read_manifest(causal_dir)

    assert causal["features"]["edge"] == blueprint["features"]["edge"] + list(features.NAMES)
    assert causal["causal_features"] == list(features.NAMES)
    assert causal["dims"]["edge"] == blueprint["dims"]["edge"] + len(features.NAMES)
    for part in ("train", "test"):  # the same edges in the same order, the same blueprint columns
        b, c = graph_store.read_part(graph_dir, part), graph_store.read_part(causal_dir, part)
        assert np.array_equal(b.edge_index, c.edge_index)
        np.testing.assert_array_equal(c.edge_attr[:, :b.edge_attr.shape[1]], b.edge_attr)


def test_causal_features_are_computed_on_the_whole_stream_before_rows_are_dropped(causal_dir, synthetic_csv):
    frame = read_transactions(synthetic_csv)
    encoders = graph_store.read_encoders(causal_dir)
    stream = features.stream_of(frame, encoders["max_cards"])
    test_rows = read_test_rows(causal_dir)
    # Each kept test row found in the file (its first occurrence: rows are unique here).
    key = ["User", "Card", "Year", "Month", "Day", "Time", "Amount"]
    position = test_rows[key].merge(frame[key].reset_index(), on=key, how="left")["index"].to_numpy()
    assert len(position) == len(test_rows)

    expected = features.compute(stream, position, 60)
    test = graph_store.read_part(causal_dir, "test")
    np.testing.assert_allclose(test.edge_attr[:, -len(features.NAMES):], expected, rtol=1e-6)
    thinned = features.compute(stream.take(position), None, 60)  # what a thinned stream would say
    assert not np.allclose(thinned, expected)


def test_the_saved_history_is_bounded_and_starts_before_the_test_period(causal_dir, synthetic_csv):
    history = pd.read_parquet(causal_dir / "history.parquet")
    manifest = graph_store.read_manifest(causal_dir)
    frame = read_transactions(synthetic_csv)
    test_start = features.minutes(2019, 1, 1, 0)

    assert list(history.columns) == ["card", "merchant", "minute", "amount", "fraud"]
    assert manifest["history"]["rows"] == len(history) < len(frame)
    assert history["minute"].min() >= test_start - features.history_days(60) * features.DAY
    assert (history["minute"] >= test_start).sum() == (frame["Year"] > 2018).sum()


@pytest.mark.parametrize("kwargs, named", [({"feature_set": "fancy"}, "feature_set"),
                                           ({"label_delay_days": -1}, "label_delay_days"),
                                           ({"label_delay_days": 1.5}, "label_delay_days")])
def test_bad_feature_settings_are_refused_before_anything_is_written(synthetic_csv, tmp_path, kwargs, named):
    with pytest.raises(ValueError, match=named):
        preprocess(synthetic_csv, tmp_path / "graph", **kwargs)
    assert not (tmp_path / "graph").exists()


def test_rows_without_the_causal_columns_cannot_be_encoded_with_causal_encoders(causal_dir, synthetic_csv):
    frame = read_transactions(synthetic_csv).head(3)
    with pytest.raises(ValueError, match="card_tx_1d"):
        encode_transactions(frame, graph_store.read_encoders(causal_dir))


def test_new_rows_of_the_test_period_get_their_batch_features_from_the_saved_history(causal_dir):
    rows = read_test_rows(causal_dir)
    encoders = graph_store.read_encoders(causal_dir)
    raw = rows.drop(columns=list(features.NAMES)).sample(frac=1, random_state=0)  # any order

    again = with_causal_features(raw, causal_dir, encoders)

    np.testing.assert_allclose(again[list(features.NAMES)].to_numpy(),
                               rows.loc[raw.index, list(features.NAMES)].to_numpy(), rtol=1e-6)


def test_rows_older_than_the_saved_history_are_refused_naming_the_row(causal_dir, synthetic_csv):
    frame = read_transactions(synthetic_csv)
    old = frame[frame["Year"] == 2010].head(2)
    with pytest.raises(ValueError, match=r"row 1 of 2 older than the history.*2010-"):
        with_causal_features(old, causal_dir, graph_store.read_encoders(causal_dir))


def test_blueprint_encoders_need_no_history(graph_dir, synthetic_csv):
    frame = read_transactions(synthetic_csv).head(3)
    assert with_causal_features(frame, graph_dir, graph_store.read_encoders(graph_dir)) is frame


def test_the_report_names_the_causal_features_as_one_group(graph_dir, causal_dir):
    from fraudlib.preprocess import report_tables

    causal = report_tables(causal_dir)["features"].loc["edge", "feature groups"]
    assert causal.endswith(f"{len(features.NAMES)} causal graph/time features") and causal.startswith("Errors")
    assert "causal" not in report_tables(graph_dir)["features"].loc["edge", "feature groups"]


def test_without_deduplication_every_non_fraud_row_can_be_drawn(synthetic_csv, tmp_path):
    raw = read_transactions(synthetic_csv)
    summary = preprocess(synthetic_csv, tmp_path / "graph", under_sample=False, deduplicate=False,
                         feature_set="blueprint")
    before_test = raw["Year"].to_numpy() <= 2018  # the test period is kept whole in any case
    assert summary.non_fraud_unique == summary.non_fraud_kept == int((raw["Is Fraud?"][before_test] == 0).sum())
    assert summary.edges["test"] == int((~before_test).sum())
    assert sum(summary.edges.values()) == len(raw)
