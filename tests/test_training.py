"""Specification of fraudlib.training: hyperparameters, phases, metrics, repeatability, learning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fraudlib import graph_store, training
from fraudlib.graph_store import Graph

# Small XGBoost settings keep the suite fast; the defaults are exercised by the benchmark.
FAST_XGB = {"num_boost_round": 40, "num_parallel_tree": 1}


def _bits(values: np.ndarray, width: int) -> np.ndarray:
    return ((values[:, None] >> np.arange(width)) & 1).astype(np.float32)


def write_planted_graph(graph_dir: Path, n_users: int = 400, n_merchants: int = 200,
                        edges_per_user: dict | None = None, seed: int = 0) -> Path:
    """A graph directory whose fraud only the graph reveals.

    In every split a fresh 15 % of users are compromised: each pays at a "risky" merchant
    (merchant category 3), and half of all their transactions, at any merchant, are fraud.
    Other users avoid risky merchants and see 1 % fraud. A transaction's own features (its
    merchant, amount, chip use) say little; a 2-hop GNN sees whether its card touched a risky
    merchant. Node features are binary codes of ids, as in the real preprocessing.
    """
    rng = np.random.default_rng(seed)
    edges_per_user = edges_per_user or {"train": 8, "validation": 4, "test": 4}
    user_bits, merchant_bits = int(np.ceil(np.log2(n_users))), int(np.ceil(np.log2(n_merchants)))
    mcc = np.arange(n_merchants) % 16
    risky, safe = np.flatnonzero(mcc == 3), np.flatnonzero(mcc != 3)
    x_user = _bits(np.arange(n_users), user_bits)
    x_merchant = np.hstack([_bits(np.arange(n_merchants), merchant_bits), _bits(mcc, 4)])

    def split_edges(split: str, per_user: int):
        compromised = rng.random(n_users) < 0.15
        src, dst, fraud = [], [], []
        for user in range(n_users):
            count = max(1, rng.poisson(per_user))
            merchants = rng.choice(safe, count)
            if compromised[user]:
                merchants[0] = rng.choice(risky)
            src += [user] * count
            dst += merchants.tolist()
            fraud += (rng.random(count) < (0.5 if compromised[user] else 0.01)).tolist()
        fraud = np.asarray(fraud, dtype=np.int64)
        amount = rng.normal(0, 1, fraud.size) + 0.3 * fraud
        chip = np.eye(3, dtype=np.float32)[rng.integers(0, 3, fraud.size)]
        attr = np.column_stack([amount, chip, rng.integers(0, 2, fraud.size)]).astype(np.float32)
        return np.vstack([src, dst]).astype(np.int64), attr, fraud, np.full(fraud.size, split, dtype=object)

    parts = {split: split_edges(split, n) for split, n in edges_per_user.items()}
    common = dict(
        x_user=x_user, x_merchant=x_merchant,
        user_features=[f"card_bit{i}" for i in range(user_bits)],
        merchant_features=[f"merchant_bit{i}" for i in range(merchant_bits)] + [f"mcc_bit{i}" for i in range(4)],
        edge_features=["amount", "chip_swipe", "chip_chip", "chip_online", "errors"],
        feature_mask_user=np.zeros(user_bits, dtype=np.int32),
        feature_mask_merchant=np.array([0] * merchant_bits + [1] * 4, dtype=np.int32),
        feature_mask_edge=np.array([0, 1, 1, 1, 2], dtype=np.int32),
    )
    train_parts = [parts["train"], parts["validation"]]
    graph_store.write_part(graph_dir, "train", Graph(
        edge_index=np.hstack([p[0] for p in train_parts]), edge_attr=np.vstack([p[1] for p in train_parts]),
        label=np.concatenate([p[2] for p in train_parts]), split=np.concatenate([p[3] for p in train_parts]),
        **common))
    ei, attr, fraud, split = parts["test"]
    graph_store.write_part(graph_dir, "test", Graph(edge_index=ei, edge_attr=attr, label=fraud, split=split,
                                                    **common))
    graph_store.write_json(graph_dir / graph_store.MANIFEST, {"source": "planted test graph", "seed": seed})
    return graph_dir


@pytest.fixture(scope="module")
def planted_graph(tmp_path_factory) -> Path:
    return write_planted_graph(tmp_path_factory.mktemp("graph") / "graph")




# The GNN needs more than the default 8 full-batch steps to learn the planted pattern.
LEARNING_GNN = {"num_epochs": 60}


@pytest.fixture(scope="module")
def trained(planted_graph, tmp_path_factory) -> training.TrainResult:
    return training.train(planted_graph, tmp_path_factory.mktemp("model"), LEARNING_GNN, FAST_XGB,
                          device="cpu", progress=False)


# --- hyperparameters --------------------------------------------------------------------------

def test_defaults_are_the_training_containers():
    assert vars(training.GNNSettings()) == {"hidden_channels": 32, "n_hops": 2, "layer": "SAGEConv",
                                            "dropout_prob": 0.1, "batch_size": 4096, "fan_out": 10,
                                            "num_epochs": 8, "node_edge_means": 1}
    assert vars(training.XGBSettings()) == {"max_depth": 6, "learning_rate": 0.2, "num_parallel_tree": 3,
                                            "num_boost_round": 512, "gamma": 0.0}


@pytest.mark.parametrize("group, params, named", [
    ("gnn_params", {"hiden_channels": 16}, "hiden_channels"),
    ("gnn_params", {"hidden_channels": "32"}, "hidden_channels"),
    ("gnn_params", {"n_hops": 2.0}, "n_hops"),
    ("gnn_params", {"num_epochs": True}, "num_epochs"),
    ("gnn_params", {"dropout_prob": 1.0}, "dropout_prob"),
    ("gnn_params", {"layer": "TransformerConv"}, "layer"),
    ("gnn_params", {"hidden_channels": 0}, "hidden_channels"),
    ("xgb_params", {"learning_rate": 0}, "learning_rate"),
    ("xgb_params", {"gamma": float("nan")}, "gamma"),
    ("xgb_params", {"max_depth": [3, 6]}, "max_depth"),
])
def test_invalid_hyperparameters_fail_before_training_naming_the_key(tmp_path, group, params, named):
    missing_graph = tmp_path / "no_graph_here"
    with pytest.raises(training.HyperparameterError, match=named) as error:
        training.train(missing_graph, tmp_path / "out", **{group: params}, progress=False)
    assert group in str(error.value)
    assert not (tmp_path / "out").exists()


def test_integers_are_accepted_where_floats_are_expected():
    assert training.parse_settings(training.GNNSettings, {"dropout_prob": 0}, "gnn_params").dropout_prob == 0.0


def test_unknown_device_is_rejected():
    with pytest.raises(ValueError, match="device"):
        training.resolve_device("tpu")


def test_auto_device_is_cuda_exactly_when_torch_sees_a_gpu():
    import torch

    assert training.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


# --- graph checks -----------------------------------------------------------------------------

def test_a_graph_without_validation_edges_is_rejected_with_the_split_file_named(tmp_path):
    graph_dir = write_planted_graph(tmp_path / "graph", n_users=60, n_merchants=40)
    train_part = graph_store.read_part(graph_dir, "train")
    train_part.split[:] = "train"
    graph_store.write_part(graph_dir, "train", train_part)
    with pytest.raises(ValueError, match="user_to_merchant_split.csv"):
        training.train(graph_dir, tmp_path / "out", progress=False)


# --- a training run ---------------------------------------------------------------------------

def test_result_reports_every_phase_and_the_package_it_wrote(trained):
    assert set(trained.seconds) == {"load", "gnn", "embed", "xgboost", "baseline", "export"}
    assert all(s >= 0 for s in trained.seconds.values())
    assert (trained.model_dir / "1" / "meta.json").is_file()
    assert trained.model_dir.name == "prediction_and_shapley"


def test_metrics_cover_both_models_on_validation_and_test(trained, planted_graph):
    expected = {"auprc", "roc_auc", "precision", "recall", "f1", "accuracy", "precision_at_threshold",
                "recall_at_threshold", "f1_at_threshold", "accuracy_at_threshold", "threshold",
                "alert_rate", "alert_rate_at_threshold"}
    for model in ("gnn_xgboost", "baseline"):
        for split in ("validation", "test"):
            assert set(trained.metrics[model][split]) == expected
        # The threshold is chosen on validation and applied unchanged to test.
        assert trained.metrics[model]["validation"]["threshold"] == trained.metrics[model]["test"]["threshold"]
    n_test = graph_store.read_part(planted_graph, "test").num_edges
    assert trained.test_labels.shape == (n_test,)
    assert {k: v.shape for k, v in trained.test_scores.items()} == {"gnn_xgboost": (n_test,), "baseline": (n_test,)}


def test_training_curve_has_one_point_per_epoch(trained):
    epochs = LEARNING_GNN["num_epochs"]
    assert trained.curve["epoch"] == list(range(1, epochs + 1))
    assert len(trained.curve["loss"]) == len(trained.curve["val_auprc"]) == epochs
    assert trained.curve["loss"][-1] < trained.curve["loss"][0]


def test_feature_importances_use_feature_names(trained):
    names = set(trained.feature_importance["gnn_xgboost"])
    assert names <= set(json.loads((trained.model_dir / "1" / "meta.json").read_text())["features"]["xgboost"])
    assert any(n.startswith("user:h") for n in names)  # the embeddings are used
    assert all(not n.startswith(("user:h", "merchant:h")) for n in trained.feature_importance["baseline"])
    gains = list(trained.feature_importance["gnn_xgboost"].values())
    assert gains == sorted(gains, reverse=True)


def test_gnn_embeddings_beat_the_tabular_baseline_where_fraud_is_in_the_graph(trained):
    gnn_auprc = trained.metrics["gnn_xgboost"]["test"]["auprc"]
    assert gnn_auprc > trained.metrics["baseline"]["test"]["auprc"] + 0.05
    assert trained.curve["val_auprc"][-1] > trained.curve["val_auprc"][0]


def test_test_scores_are_what_the_exported_model_predicts_on_the_test_graph(trained, planted_graph):
    from fraudlib.model_export import load_model

    model = load_model(trained.model_dir)
    np.testing.assert_allclose(model.predict(graph_store.read_part(planted_graph, "test")),
                               trained.test_scores["gnn_xgboost"], atol=1e-6)


def test_test_edges_scored_in_batches_score_as_one_batch(trained, planted_graph, monkeypatch, tmp_path):
    monkeypatch.setattr(training, "TEST_BATCH_EDGES", 97)  # 1,611 test edges: 17 batches, the last short

    again = training.train(planted_graph, tmp_path / "model", LEARNING_GNN, FAST_XGB, device="cpu", progress=False)

    for model, scores in trained.test_scores.items():
        np.testing.assert_array_equal(again.test_scores[model], scores)
    assert again.metrics == trained.metrics


def test_same_seed_gives_the_same_model_on_cpu(planted_graph, tmp_path):
    runs = [training.train(planted_graph, tmp_path / name, {"num_epochs": 3}, FAST_XGB, device="cpu",
                           seed=7, progress=False) for name in ("a", "b")]
    assert runs[0].metrics == runs[1].metrics
    np.testing.assert_array_equal(runs[0].test_scores["gnn_xgboost"], runs[1].test_scores["gnn_xgboost"])
    assert runs[0].curve == runs[1].curve


def test_parallel_trees_without_sampling_are_one_tree_repeated():
    # Why the trainer grows one tree per round whatever num_parallel_tree says.
    import xgboost as xgb

    rng = np.random.default_rng(0)
    x = rng.random((500, 4))
    data = xgb.DMatrix(x, label=(x[:, 0] + rng.random(500) > 1).astype(int))
    params = {"objective": "binary:logistic", "tree_method": "hist", "max_depth": 4, "nthread": 1}
    one, three = (xgb.train({**params, "num_parallel_tree": k}, data, 5) for k in (1, 3))
    np.testing.assert_allclose(one.predict(data), three.predict(data), rtol=1e-6)


def test_sampled_epoch_trains_on_minibatches_shaped_like_link_neighbor_loader_output_double(planted_graph):
    # pyg-lib / torch-sparse are not installable here, so LinkNeighborLoader cannot run: this
    # feeds the mini-batch step hand-made batches of the same shape (a test double of the sampler).
    import torch
    from torch_geometric.data import HeteroData

    from fraudlib import gnn

    part = graph_store.read_part(planted_graph, "train")
    train = part.edges(part.split == "train")
    xu, xm, ei, ea = training._tensors(train, "cpu")
    y = torch.as_tensor(train.label)

    def batch(ids: torch.Tensor) -> HeteroData:
        users, src = torch.unique(ei[0, ids], return_inverse=True)
        merchants, dst = torch.unique(ei[1, ids], return_inverse=True)
        b = HeteroData()
        b["user"].x, b["merchant"].x = xu[users], xm[merchants]
        b[gnn.USER_TO_MERCHANT].edge_index = torch.stack([src, dst])
        b[gnn.MERCHANT_TO_USER].edge_index = torch.stack([dst, src])
        b[gnn.USER_TO_MERCHANT].edge_label_index = torch.stack([src, dst])
        b[gnn.USER_TO_MERCHANT].edge_label = ids
        return b

    torch.manual_seed(0)
    model = gnn.FraudGNN(xu.shape[1], xm.shape[1], ea.shape[1], hidden_channels=8).train()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    batches = [batch(ids) for ids in torch.randperm(train.num_edges).split(512)]
    loss = training._sampled_epoch(model, batches, ea, y, training._class_weights(y), optimizer)
    assert np.isfinite(loss) and loss > 0
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_compacting_a_graph_to_its_touched_nodes_leaves_every_edge_score_unchanged():
    import torch

    from fraudlib.gnn import FraudGNN
    from fraudlib.graph_store import compact
    from fraudlib.training import _tensors

    rng = np.random.default_rng(3)
    g = Graph(x_user=rng.random((50, 4), dtype=np.float32), x_merchant=rng.random((70, 5), dtype=np.float32),
              edge_index=np.vstack([rng.integers(0, 20, 80), rng.integers(30, 60, 80)]),
              edge_attr=rng.random((80, 3), dtype=np.float32), label=rng.integers(0, 2, 80),
              split=np.full(80, "test", dtype=object))
    small = compact(g)
    assert small.x_user.shape[0] <= 20 and small.x_merchant.shape[0] <= 30
    torch.manual_seed(0)
    model = FraudGNN(4, 5, 3, hidden_channels=8).eval()
    with torch.no_grad():
        np.testing.assert_allclose(model(*_tensors(small, "cpu")).numpy(), model(*_tensors(g, "cpu")).numpy(),
                                   rtol=1e-5, atol=1e-6)


def test_period_masks_split_a_graph_by_year_and_cover_every_edge_once():
    from fraudlib.training import period_masks

    g = Graph(x_user=np.zeros((2, 1), np.float32), x_merchant=np.zeros((2, 1), np.float32),
              edge_index=np.zeros((2, 5), np.int64), edge_attr=np.zeros((5, 1), np.float32),
              label=np.zeros(5, np.int64), split=np.full(5, "train", dtype=object),
              year=np.array([2001, 2000, 2001, 2003, 2000]))
    masks = period_masks(g)
    assert len(masks) == 3
    assert np.array_equal(np.sum(masks, axis=0), np.ones(5))


# --- controls and the operating threshold ------------------------------------------------------

def test_the_baseline_sees_the_row_only_and_graph_features_get_their_own_control(tmp_path):
    """A causal feature column (named as fraudlib.features names it) that reveals the fraud:
    the row-only baseline must not see it, the graph_features control must."""
    from fraudlib import features

    graph_dir = write_planted_graph(tmp_path / "graph")
    for part in ("train", "test"):
        g = graph_store.read_part(graph_dir, part)
        revealing = (g.label + np.random.default_rng(1).normal(0, 0.3, g.num_edges)).astype(np.float32)
        g.edge_attr = np.column_stack([g.edge_attr, revealing])
        g.edge_features = list(g.edge_features) + [features.NAMES[0]]
        g.feature_mask_edge = np.append(g.feature_mask_edge, 3).astype(np.int32)
        graph_store.write_part(graph_dir, part, g)

    r = training.train(graph_dir, tmp_path / "model", {"num_epochs": 2}, FAST_XGB, device="cpu", progress=False)

    assert set(r.metrics) == {"gnn_xgboost", "baseline", "graph_features"}
    assert "edge:" + features.NAMES[0] not in r.feature_importance["baseline"]
    assert "edge:" + features.NAMES[0] in r.feature_importance["graph_features"]
    assert r.metrics["graph_features"]["test"]["auprc"] > r.metrics["baseline"]["test"]["auprc"] + 0.1


def test_without_causal_features_there_is_no_graph_features_control(trained):
    assert set(trained.metrics) == {"gnn_xgboost", "baseline"}


def test_a_target_alert_rate_sets_the_threshold_that_flags_that_share_of_validation(planted_graph, tmp_path):
    r = training.train(planted_graph, tmp_path / "model", {"num_epochs": 2}, FAST_XGB, device="cpu",
                       progress=False, alert_rate=0.02)

    for model in r.metrics:
        assert 0.01 < r.metrics[model]["validation"]["alert_rate_at_threshold"] <= 0.02
    meta = json.loads((r.model_dir / "1" / "meta.json").read_text())
    assert meta["threshold"] == r.metrics["gnn_xgboost"]["validation"]["threshold"]
    assert meta["threshold_rule"] == "alert rate 0.02 on validation"


def test_an_alert_rate_outside_0_1_is_refused_before_training(planted_graph, tmp_path):
    with pytest.raises(training.HyperparameterError, match="alert_rate"):
        training.train(planted_graph, tmp_path / "model", alert_rate=1.5, progress=False)


# --- message passing over a label-independent context -------------------------------------------

def _star_graph(labels: list[int], users: list[int], merchants: list[int]) -> Graph:
    n = len(labels)
    return Graph(x_user=np.zeros((max(users) + 1, 1), np.float32), x_merchant=np.zeros((max(merchants) + 1, 1), np.float32),
                 edge_index=np.array([users, merchants], np.int64), edge_attr=np.zeros((n, 1), np.float32),
                 label=np.array(labels, np.int64), split=np.full(n, "train", dtype=object))


def test_context_keeps_every_non_fraud_edge_and_fraud_edges_at_the_non_fraud_rate():
    rng = np.random.default_rng(0)
    n = 20_000
    labels = (rng.random(n) < 0.5).astype(int).tolist()
    # Every node has non-fraud edges too, so no node needs an edge kept for it.
    users = (np.arange(n) % 50).tolist()
    merchants = (np.arange(n) % 40).tolist()
    g = _star_graph(labels, users, merchants)
    keep = training.context_mask(g, 0.1, seed=3)
    fraud = g.label == 1
    assert keep[~fraud].all()
    share = keep[fraud].mean()
    assert abs(share - 0.1) < 4 * np.sqrt(0.1 * 0.9 / fraud.sum())  # binomial, 4 sigma
    np.testing.assert_array_equal(keep, training.context_mask(g, 0.1, seed=3))  # seeded
    assert training.context_mask(g, 1.0, seed=3).all()


def test_context_gives_a_node_seen_only_in_fraud_edges_one_of_them():
    # user 1 and merchants 4, 5 appear in fraud edges only; with rate 0 no fraud edge is drawn.
    g = _star_graph([0, 0, 1, 1, 1, 1], users=[0, 0, 1, 1, 1, 0], merchants=[2, 3, 4, 4, 5, 5])
    for seed in range(20):
        keep = training.context_mask(g, 0.0, seed=seed)
        assert keep[:2].all()
        users, merchants = g.edge_index[:, keep]
        # every node has a context edge (none is embedded from its own features alone) ...
        assert set(users) == {0, 1} and set(merchants) == {2, 3, 4, 5}
        # ... and no more fraud edges than the lonely nodes need: one for merchant 4 (whose
        # edge also serves user 1) and one for merchant 5, or one more when user 1 drew edge 4
        assert 2 <= keep[2:].sum() <= 3


def test_context_rate_is_the_kept_share_of_non_fraud_rows_from_the_manifest(tmp_path):
    (tmp_path / graph_store.MANIFEST).write_text(json.dumps({"rows": {"non_fraud_kept": 50, "non_fraud_unique": 2000}}))
    assert training.context_rate(tmp_path) == 0.025
    assert training.context_rate(tmp_path / "missing") == 1.0  # not undersampled: every edge is context
