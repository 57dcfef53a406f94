"""Scoring in graph context: the receptive field gives the same answer as the whole graph."""

import numpy as np
import pytest
import torch

from fraudlib.gnn import FraudGNN
from fraudlib.graph_store import Graph
from fraudlib.scoring import (Adjacency, append_edges, feature_groups, field_hops, receptive_field, sampled_field,
                              score_in_context)


def random_graph(seed=0, users=60, merchants=40, edges=300, fu=5, fm=6, fe=4):
    rng = np.random.default_rng(seed)
    return Graph(
        x_user=rng.integers(0, 2, (users, fu)).astype(np.float32),
        x_merchant=rng.integers(0, 2, (merchants, fm)).astype(np.float32),
        edge_index=np.vstack([rng.integers(0, users, edges), rng.integers(0, merchants, edges)]),
        edge_attr=rng.normal(size=(edges, fe)).astype(np.float32),
        label=rng.integers(0, 2, edges), split=np.full(edges, "test", dtype=object),
        user_features=[f"Card_{i}" for i in range(fu)], merchant_features=[f"M_{i}" for i in range(fm)],
        edge_features=[f"E_{i}" for i in range(fe)], feature_mask_user=np.zeros(fu, dtype=np.int32),
        feature_mask_merchant=np.ones(fm, dtype=np.int32), feature_mask_edge=np.full(fe, 2, dtype=np.int32))


def logits(model, g: Graph) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(g.x_user), torch.from_numpy(g.x_merchant),
                     torch.from_numpy(g.edge_index), torch.from_numpy(g.edge_attr)).numpy()


def in_context(model, g: Graph, users, merchants, attr, n_hops):
    """score_in_context's logits of the rows, and its context's number of edges."""
    arch = {"n_hops": n_hops, "edge_means": model.edge_means}
    out, edges = score_in_context(g, users, merchants, attr, lambda sub, pos: logits(model, sub)[pos],
                                  field_hops(arch))
    return out.reshape(len(users), -1), edges


@pytest.mark.parametrize("edge_means", [0, 1], ids=["id codes", "edge means in node inputs"])
@pytest.mark.parametrize("n_hops", [1, 2, 3])
def test_targets_score_the_same_inside_their_receptive_field_as_inside_the_whole_graph(n_hops, edge_means):
    torch.manual_seed(0)
    g = random_graph(users=600, merchants=400, edges=900)
    model = FraudGNN(5, 6, 4, hidden_channels=8, n_hops=n_hops, edge_means=edge_means).eval()
    targets = np.array([3, 150, 299])
    got, context = in_context(model, g, *g.edge_index[:, targets], g.edge_attr[targets], n_hops)
    assert context < g.num_edges
    np.testing.assert_allclose(got, logits(model, g)[targets], rtol=1e-5, atol=1e-5)


def test_a_field_of_most_of_the_context_is_scored_in_the_whole_context_with_the_same_scores():
    torch.manual_seed(0)
    g = random_graph()  # dense: 300 edges between 60 cards and 40 merchants
    model = FraudGNN(5, 6, 4, hidden_channels=8, n_hops=2, edge_means=1).eval()
    targets = np.array([3, 150])
    field = receptive_field(g, targets, 3)
    assert g.num_edges / 2 < field.size < g.num_edges
    users, merchants, attr = g.edge_index[0, targets], g.edge_index[1, targets], g.edge_attr[targets]
    new = np.array([g.x_user.shape[0] - 1]), merchants[:1], attr[:1] + 1.0  # and a new row

    got, context = in_context(model, g, np.r_[users, new[0]], np.r_[merchants, new[1]], np.vstack([attr, new[2]]), 2)

    assert context == g.num_edges + 1
    whole = logits(model, append_edges(g, *new))
    np.testing.assert_allclose(got, whole[[3, 150, g.num_edges]], rtol=1e-5, atol=1e-5)


def test_new_rows_score_as_appended_to_the_whole_graph_and_known_rows_as_their_own_edges():
    torch.manual_seed(0)
    g = random_graph(users=600, merchants=400, edges=900)
    model = FraudGNN(5, 6, 4, hidden_channels=8, n_hops=2, edge_means=1).eval()
    rows = np.array([5, 9, 5, 700])
    users, merchants, attr = g.edge_index[0, rows], g.edge_index[1, rows], g.edge_attr[rows].copy()
    attr[1, 0] += 1.0  # row 2: same card and merchant, other features: another transaction
    users[3] = 599  # row 4: a card's new merchant
    got, _ = in_context(model, g, users, merchants, attr, 2)
    whole = logits(model, append_edges(g, users[[1, 3]], merchants[[1, 3]], attr[[1, 3]]))
    np.testing.assert_allclose(got, whole[[5, g.num_edges, 5, g.num_edges + 1]], rtol=1e-5, atol=1e-5)


def test_a_lone_edge_scores_differently_than_inside_its_context():
    torch.manual_seed(0)
    g = random_graph()
    model = FraudGNN(5, 6, 4, hidden_channels=8, n_hops=2).eval()
    alone = g.edges(np.isin(np.arange(g.num_edges), [3]))
    assert not np.allclose(logits(model, alone)[0], logits(model, g)[3], atol=1e-4)


def test_receptive_field_of_one_hop_is_the_edges_of_the_two_endpoints():
    g = random_graph()
    u, m = g.edge_index[:, 7]
    expected = np.flatnonzero((g.edge_index[0] == u) | (g.edge_index[1] == m))
    np.testing.assert_array_equal(receptive_field(g, np.array([7]), 1), expected)


def test_appended_edges_are_unlabelled_and_come_after_the_graph_edges():
    g = random_graph()
    out = append_edges(g, np.array([1, 2]), np.array([3, 4]), np.zeros((2, 4), np.float32))
    assert out.num_edges == g.num_edges + 2
    assert list(out.label[-2:]) == [-1, -1] and list(out.split[-2:]) == ["new", "new"]
    assert out.edge_index[:, -1].tolist() == [2, 4]


def test_feature_groups_name_each_group_once_by_its_column_stem():
    assert feature_groups(["City_0", "City_1", "Amount", "Chip_a", "Chip_b"], [3, 3, 4, 5, 5]) == \
        ["City", "Amount", "Chip"]


def test_the_explanation_cap_is_read_from_the_models_config():
    from pathlib import Path

    from fraudlib.scoring import max_shap_edges

    shipped = (Path(__file__).resolve().parent.parent / "triton" / "config.pbtxt").read_text()
    assert max_shap_edges(shipped) == 8192
    assert max_shap_edges('parameters: { key: "other" value: { string_value: "1" } }') is None


def test_new_rows_need_no_label_and_a_label_present_is_still_read(write_tabformer):
    from conftest import TABFORMER_HEADER
    from fraudlib.scoring import read_rows
    from fraudlib.tabformer import TabFormerFormatError, read_transactions

    line = "0,0,2019,1,2,06:21,$134.09,Swipe Transaction,3527213246127876953,La Verne,CA,91750.0,5300,"
    unlabelled = write_tabformer([line], name="new.csv", header=TABFORMER_HEADER.rsplit(",", 1)[0])
    frame = read_rows(unlabelled)
    assert "Is Fraud?" not in frame and frame["Amount"].tolist() == [134.09]
    with pytest.raises(TabFormerFormatError, match="lacks column"):
        read_transactions(unlabelled)  # training data keeps needing its labels
    labelled = write_tabformer([line + ",No"], name="labelled.csv")
    assert read_rows(labelled)["Is Fraud?"].tolist() == [0]


def test_raw_rows_are_the_text_the_reader_parses_back(write_tabformer):
    from fraudlib.scoring import parse_raw, raw_rows, read_rows

    path = write_tabformer([
        "0,0,2019,1,2,06:21,$134.09,Swipe Transaction,3527213246127876953,La Verne,CA,91750.0,5300,,No",
        '1,2,2019,3,4,23:05,$-292.00,Online Transaction,-727612092139916043,ONLINE,,,5311,"Bad PIN,",Yes',
    ])
    frame = read_rows(path)
    back = parse_raw(raw_rows(frame))
    assert back.columns.tolist() == frame.columns.tolist()
    for column in frame.columns:
        assert back[column].astype(str).tolist() == frame[column].astype(str).tolist(), column


def test_rows_lacking_a_column_are_refused_naming_it():
    import pandas as pd

    from fraudlib.scoring import parse_raw

    with pytest.raises(ValueError, match=r"lack the TabFormer column\(s\) \['Zip'\]"):
        parse_raw(pd.DataFrame({c: ["1"] for c in ("User", "Card", "Year", "Month", "Day", "Time", "Amount",
                                                   "Use Chip", "Merchant Name", "Merchant City",
                                                   "Merchant State", "MCC", "Errors?")}))


def test_scores_are_measured_against_labels_only_when_the_rows_have_them():
    import pandas as pd

    from fraudlib.scoring import label_metrics

    scored = pd.DataFrame({"fraud_probability": [0.9, 0.2, 0.7, np.nan, 0.1], "Is Fraud?": [1, 0, 0, 1, 0]})
    summary = label_metrics(scored, threshold=0.5)
    assert summary["rows"] == 4 and summary["fraud"] == 1  # the unscored row is left out
    assert summary["auprc"] == pytest.approx(1.0) and summary["recall_at_threshold"] == 1.0
    assert summary["alert_rate_at_threshold"] == pytest.approx(0.5)
    assert label_metrics(scored.drop(columns=["Is Fraud?"]), 0.5) is None
    one_class = label_metrics(scored[scored["Is Fraud?"] == 0], 0.5)
    assert "auprc" not in one_class and "one class only" in one_class["note"]


@pytest.mark.parametrize("name", ["scores.csv", "scores.parquet"])
def test_scores_are_written_whole_as_csv_or_parquet_by_the_suffix(tmp_path, name):
    import pandas as pd

    from fraudlib.scoring import write_scores

    scored = pd.DataFrame({"line": [2, 3], "fraud_probability": [0.25, np.nan], "note": ["", "not scored"]})
    out = write_scores(scored, tmp_path / name)
    back = pd.read_parquet(out) if name.endswith(".parquet") else pd.read_csv(out, keep_default_na=False,
                                                                              na_values=[""])
    assert back["line"].tolist() == [2, 3] and back["fraud_probability"].iloc[0] == 0.25
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left beside it


@pytest.mark.parametrize("n_hops", [1, 2, 3])
def test_the_field_bound_says_exceeds_only_for_fields_larger_than_the_cap(n_hops):
    from fraudlib.scoring import _FieldBound

    g = random_graph(users=600, merchants=400, edges=900)
    bound = _FieldBound(g, n_hops)
    sizes = np.array([receptive_field(g, np.array([e]), n_hops).size for e in range(g.num_edges)])
    for cap in (5, int(np.median(sizes)), 10_000):
        said = np.array([bound.exceeds(e, cap) for e in range(g.num_edges)])
        assert (sizes[said] > cap).all()  # never wrong
        if cap == 5 and n_hops > 1:  # and it passes over the fields far above the cap
            assert said[sizes > 4 * cap].all()


@pytest.mark.parametrize("n_hops", [1, 2, 3])
def test_a_fanout_above_every_degree_samples_the_whole_receptive_field(n_hops):
    g = random_graph(users=600, merchants=400, edges=900)
    targets = np.array([3, 150, 299])
    sizes = g.x_user.shape[0], g.x_merchant.shape[0]
    most = max(np.bincount(g.edge_index[0]).max(), np.bincount(g.edge_index[1]).max())
    np.testing.assert_array_equal(sampled_field(Adjacency(g.edge_index, *sizes), targets, n_hops, fanout=most),
                                  receptive_field(g, targets, n_hops))


def test_a_sampled_field_draws_at_most_fanout_edges_of_each_node_per_hop_and_keeps_the_targets():
    g = random_graph()  # dense: 300 edges between 60 cards and 40 merchants, degrees ~5-8
    graph, targets = Adjacency(g.edge_index, g.x_user.shape[0], g.x_merchant.shape[0]), np.array([3, 150])
    one_hop = sampled_field(graph, targets, 1, fanout=2)
    # hop 1: the targets plus at most 2 edges of each of their (up to 4) endpoints
    assert set(targets) <= set(one_hop) and len(one_hop) <= 2 + 4 * 2
    ends = g.edge_index[:, one_hop]
    endpoints = [set(g.edge_index[0, targets]), set(g.edge_index[1, targets])]
    assert all(ends[0, i] in endpoints[0] or ends[1, i] in endpoints[1] for i in range(len(one_hop)))
    three = sampled_field(graph, targets, 3, fanout=2)
    assert set(one_hop) <= set(receptive_field(g, targets, 1)) and len(three) < receptive_field(g, targets, 3).size
    np.testing.assert_array_equal(three, sampled_field(graph, targets, 3, fanout=2))  # seeded
    assert not np.array_equal(three, sampled_field(graph, targets, 3, fanout=2, seed=1))
    with pytest.raises(ValueError, match="fanout must be >= 1"):
        sampled_field(graph, targets, 3, fanout=0)


def test_rows_scored_with_a_fanout_score_as_inside_their_sampled_field():
    torch.manual_seed(0)
    g = random_graph(users=600, merchants=400, edges=900)
    model = FraudGNN(5, 6, 4, hidden_channels=8, n_hops=2, edge_means=1).eval()
    targets = np.array([3, 150, 299])
    users, merchants, attr = g.edge_index[0, targets], g.edge_index[1, targets], g.edge_attr[targets]
    got, context = score_in_context(g, users, merchants, attr, lambda sub, pos: logits(model, sub)[pos], 3, fanout=2)
    field = sampled_field(Adjacency(g.edge_index, g.x_user.shape[0], g.x_merchant.shape[0]), targets, 3, fanout=2)
    assert context == field.size < receptive_field(g, targets, 3).size
    sub = g.edges(field)
    np.testing.assert_allclose(got.reshape(3, -1), logits(model, sub)[np.searchsorted(field, targets)], rtol=1e-6)
