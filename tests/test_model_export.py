"""Specification of the model package: fraudlib.model_export and triton/model.py, in-process and
served by the real Triton server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from fraudlib import graph_store, model_export, training
from fraudlib.settings import TRITON_MODEL_NAME, project_root
from fraudlib.triton_server import EmbeddedTriton, TritonError
from test_training import FAST_XGB, write_planted_graph  # the planted-signal graph builder

GNN = {"num_epochs": 10, "hidden_channels": 16}


@pytest.fixture(scope="module")
def graph_dir(tmp_path_factory) -> Path:
    return write_planted_graph(tmp_path_factory.mktemp("graph") / "graph", n_users=150, n_merchants=80)


@pytest.fixture(scope="module")
def test_graph(graph_dir) -> graph_store.Graph:
    return graph_store.read_part(graph_dir, "test")


@pytest.fixture(scope="module")
def result(graph_dir, tmp_path_factory) -> training.TrainResult:
    return training.train(graph_dir, tmp_path_factory.mktemp("out"), GNN, FAST_XGB, device="cpu",
                          progress=False)


@pytest.fixture(scope="module")
def model(result) -> model_export.LoadedModel:
    return model_export.load_model(result.model_dir)


def _contract_inputs(graph: graph_store.Graph, compute_shap: bool = False) -> dict[str, np.ndarray]:
    return {
        "x_user": graph.x_user, "x_merchant": graph.x_merchant,
        "edge_index_user_to_merchant": graph.edge_index, "edge_attr_user_to_merchant": graph.edge_attr,
        "feature_mask_user": graph.feature_mask_user.astype(np.int32),
        "feature_mask_merchant": graph.feature_mask_merchant.astype(np.int32),
        "edge_feature_mask_user_to_merchant": graph.feature_mask_edge.astype(np.int32),
        "COMPUTE_SHAP": np.array([compute_shap]),
    }


# --- the package on disk ----------------------------------------------------------------------

def test_package_has_the_blueprint_layout_and_nothing_else(result):
    assert result.model_dir == result.model_dir.parent / TRITON_MODEL_NAME
    assert sorted(p.name for p in result.model_dir.iterdir()) == ["1", "config.pbtxt"]
    assert sorted(p.name for p in (result.model_dir / "1").iterdir()) == sorted(
        model_export.FILES + model_export.NATIVE_FILES)
    assert [p.name for p in result.model_dir.parent.iterdir()] == [TRITON_MODEL_NAME]  # no temp folders


def test_version_code_is_copied_verbatim(result):
    version = result.model_dir / "1"
    assert (version / "gnn_model.py").read_bytes() == (project_root() / "fraudlib" / "gnn.py").read_bytes()
    assert (version / "model.py").read_bytes() == (project_root() / "triton" / "model.py").read_bytes()
    assert (version / "forest.c").read_bytes() == (project_root() / "triton" / "forest.c").read_bytes()


def test_config_is_complete_and_follows_the_serving_contract(result, test_graph):
    config = text_format.Parse((result.model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    dtype = model_config_pb2.DataType.Name
    assert (config.name, config.backend, config.max_batch_size) == (TRITON_MODEL_NAME, "python", 0)
    u, m, e = test_graph.x_user.shape[1], test_graph.x_merchant.shape[1], test_graph.edge_attr.shape[1]
    assert {i.name: (dtype(i.data_type), list(i.dims)) for i in config.input} == {
        "x_user": ("TYPE_FP32", [-1, u]),
        "x_merchant": ("TYPE_FP32", [-1, m]),
        "edge_index_user_to_merchant": ("TYPE_INT64", [2, -1]),
        "edge_attr_user_to_merchant": ("TYPE_FP32", [-1, e]),
        "feature_mask_user": ("TYPE_INT32", [-1]),
        "feature_mask_merchant": ("TYPE_INT32", [-1]),
        "edge_feature_mask_user_to_merchant": ("TYPE_INT32", [-1]),
        "COMPUTE_SHAP": ("TYPE_BOOL", [1]),
    }
    assert {o.name: (dtype(o.data_type), list(o.dims)) for o in config.output} == {
        "PREDICTION": ("TYPE_FP32", [-1, 1]),
        "shap_values_user": ("TYPE_FP32", [-1, -1]),
        "shap_values_merchant": ("TYPE_FP32", [-1, -1]),
        "shap_values_user_to_merchant": ("TYPE_FP32", [-1, -1]),
    }
    # Two instances: an explanation holds one, scoring keeps the other (tests/faults/test_serving_requests.py).
    assert [(g.kind, g.count) for g in config.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_CPU, 2)]
    assert config.parameters["max_shap_edges"].string_value == "8192"
    assert not config.HasField("version_policy")  # owned by the repository module


def test_meta_records_what_the_model_needs_and_where_it_came_from(result, graph_dir, test_graph):
    meta = json.loads((result.model_dir / "1" / "meta.json").read_text())
    assert meta["architecture"]["user_channels"] == test_graph.x_user.shape[1]
    assert meta["features"]["edge"] == test_graph.edge_features
    assert meta["feature_masks"]["merchant"] == test_graph.feature_mask_merchant.tolist()
    assert meta["hyperparameters"]["gnn"]["hidden_channels"] == GNN["hidden_channels"]
    assert meta["hyperparameters"]["xgb"]["num_boost_round"] == FAST_XGB["num_boost_round"]
    assert meta["manifest_hash"] == graph_store.manifest_hash(graph_dir)
    assert meta["threshold"] == result.metrics["gnn_xgboost"]["validation"]["threshold"]
    assert len(meta["features"]["xgboost"]) == sum(test_graph.x_user.shape[1:]) + sum(
        test_graph.x_merchant.shape[1:]) + test_graph.edge_attr.shape[1] + 2 * GNN["hidden_channels"]


def test_exporting_again_replaces_the_package_and_leaves_no_temporary_folders(result, model, tmp_path):
    target = shutil.copytree(result.model_dir, tmp_path / TRITON_MODEL_NAME)
    (target / "1" / "stale.txt").write_text("from an earlier export")
    model_export.export_model(tmp_path, model.predictor.gnn, model.predictor.booster,
                              {k: v for k, v in model.meta.items() if k not in ("shap", "versions")})
    assert not (target / "1" / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == [TRITON_MODEL_NAME]


# --- in-process model -------------------------------------------------------------------------

def test_load_model_takes_the_model_folder_or_its_version_folder(result, model, test_graph):
    again = model_export.load_model(result.model_dir / "1")
    np.testing.assert_array_equal(again.predict(test_graph), model.predict(test_graph))


def test_load_model_names_missing_files(result, tmp_path):
    broken = shutil.copytree(result.model_dir, tmp_path / TRITON_MODEL_NAME)
    (broken / "1" / "embedding_based_xgboost.json").unlink()
    with pytest.raises(FileNotFoundError, match="embedding_based_xgboost.json"):
        model_export.load_model(broken)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        model_export.load_model(tmp_path)


def test_two_versions_load_side_by_side_each_with_its_own_code(graph_dir, result, model, test_graph, tmp_path):
    other = training.train(graph_dir, tmp_path, {**GNN, "hidden_channels": 8}, FAST_XGB, device="cpu",
                           progress=False)
    other_model = model_export.load_model(other.model_dir)
    assert type(other_model.predictor.gnn).__module__ != type(model.predictor.gnn).__module__
    np.testing.assert_allclose(other_model.predict(test_graph), other.test_scores["gnn_xgboost"], atol=1e-6)
    np.testing.assert_allclose(model.predict(test_graph), result.test_scores["gnn_xgboost"], atol=1e-6)


@pytest.mark.parametrize("change, named", [
    (lambda g: g.x_user.__setitem__((0, 0), np.nan), "x_user"),
    (lambda g: g.edge_attr.__setitem__((0, 0), np.inf), "edge_attr_user_to_merchant"),
    (lambda g: g.edge_index.__setitem__((1, 0), 10_000), "edge_index_user_to_merchant row 1"),
    (lambda g: g.edge_index.__setitem__((0, 0), -1), "edge_index_user_to_merchant row 0"),
    (lambda g: setattr(g, "x_merchant", g.x_merchant[:, :-1]), "x_merchant"),
    (lambda g: setattr(g, "edge_attr", g.edge_attr[:-1]), "edge_attr_user_to_merchant"),
    (lambda g: setattr(g, "x_user", g.x_user.astype(np.int64)), "x_user"),
    # Finite in float64, infinite once cast to the model's float32.
    (lambda g: setattr(g, "x_merchant", np.full(g.x_merchant.shape, 1e300)), "x_merchant contains NaN, infinite"),
])
def test_invalid_inputs_are_rejected_naming_the_input(model, graph_dir, change, named):
    graph = graph_store.read_part(graph_dir, "test")
    change(graph)
    with pytest.raises(ValueError, match=named):
        model.predict(graph)


@pytest.mark.parametrize("rows", [0, 1, 7, 5000])
def test_the_direct_xgboost_call_predicts_bitwise_what_inplace_predict_does(model, rows):
    predictor = model.predictor
    features = np.random.default_rng(rows).normal(size=(rows, predictor.booster.num_features()))
    features = features.astype(np.float32)
    expected = predictor.booster.inplace_predict(features) if rows else np.zeros(0, np.float32)
    got = predictor.xgboost_predict(features)
    assert got.dtype == np.float32 and np.array_equal(got, expected)


def test_the_direct_xgboost_call_reports_xgboosts_error(model):
    with pytest.raises(RuntimeError, match="Number of columns in data must equal"):
        model.predictor.xgboost_predict(np.zeros((2, 3), np.float32))


# --- the compiled trees (forest.c) --------------------------------------------------------------

def _features(model, graph: graph_store.Graph) -> np.ndarray:
    """The XGBoost input of every edge of ``graph``, as the backend computes it."""
    tensors = [torch.as_tensor(a) for a in (graph.x_user, graph.x_merchant, graph.edge_index, graph.edge_attr)]
    return model.predictor.gnn.edge_features(*tensors).numpy()


def test_the_cpu_backend_evaluates_the_trees_with_the_compiled_forest(model):
    assert model.predictor.tree_path.startswith("compiled trees")
    assert model.predictor.compiled_predict is not None


@pytest.mark.parametrize("rows", ["test graph", "random", "on thresholds", "missing values", "none"])
def test_the_compiled_forest_predicts_bitwise_what_xgboost_does(model, test_graph, rows):
    predictor = model.predictor
    compiled = predictor.compiled_predict
    width = predictor.booster.num_features()
    rng = np.random.default_rng(7)
    features = {
        "test graph": lambda: _features(model, test_graph),
        "random": lambda: rng.normal(scale=3, size=(3000, width)),
        "on thresholds": lambda: compiled.probe_rows(3000),
        "missing values": lambda: np.where(rng.random((3000, width)) < 0.3, np.nan, rng.normal(size=(3000, width))),
        "none": lambda: np.zeros((0, width)),
    }[rows]().astype(np.float32)
    expected = predictor.booster.inplace_predict(features) if len(features) else np.zeros(0, np.float32)
    got = compiled(features)
    assert got.dtype == np.float32 and got.shape == (len(features),)
    assert np.array_equal(got, expected), f"{np.sum(got != expected)} of {len(got)} rows differ"


def test_requests_up_to_max_rows_use_the_compiled_forest_and_larger_ones_xgboost(model, monkeypatch):
    predictor = model.predictor
    limit = type(predictor.compiled_predict).MAX_ROWS
    calls = []
    compiled = predictor.compiled_predict
    monkeypatch.setattr(predictor, "compiled_predict", lambda f: calls.append(len(f)) or compiled(f))
    rng = np.random.default_rng(3)
    for rows in (1, limit, limit + 1, 10 * limit):
        features = rng.normal(size=(rows, predictor.booster.num_features())).astype(np.float32)
        assert np.array_equal(predictor.predict_dense(features), predictor.booster.inplace_predict(features))
    assert calls == [1, limit]


def test_the_compiled_forest_rejects_a_wrong_width(model):
    with pytest.raises(ValueError, match=r"XGBoost input must have shape \[-1, \d+\], got \[2, 3\]"):
        model.predictor.compiled_predict(np.zeros((2, 3), np.float32))


def _package_variant(result, tmp_path, change) -> Path:
    """A copy of the package whose version directory was changed by ``change(version_dir)``."""
    package = shutil.copytree(result.model_dir, tmp_path / TRITON_MODEL_NAME)
    change(package / "1")
    return package


def _recompile(version: Path, source: str, text: str) -> None:
    """``source`` (forest.c or sage.c) rewritten as ``text`` and compiled into its library."""
    library = version / model_export.NATIVE_SOURCES[source]
    (version / source).write_text(text)
    library.unlink()
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(library), str(version / source), "-lm"],
                   check=True)


@pytest.mark.parametrize("change, reason", [
    (lambda v: (v / "libforest.so").unlink(), "no libforest.so in the version directory"),
    (lambda v: (v / "libforest.so").write_bytes(b"not a shared library"), "libforest.so does not load here"),
    # A forest that sends a feature equal to its threshold left: wrong on the probe rows only.
    (lambda v: _recompile(v, "forest.c", (v / "forest.c").read_text().replace("v < forest->value[n]",
                                                                               "v <= forest->value[n]")),
     "does not reproduce XGBoost's predictions on probe rows"),
], ids=["missing", "unloadable", "wrong"])
def test_without_a_trustworthy_compiled_forest_xgboost_serves(result, model, test_graph, tmp_path, change, reason):
    fallback = model_export.load_model(_package_variant(result, tmp_path, change))
    assert reason in fallback.predictor.tree_path
    assert fallback.predictor.compiled_predict is None
    np.testing.assert_array_equal(fallback.predict(test_graph), model.predict(test_graph))


def test_export_without_a_c_compiler_warns_and_the_package_still_serves(result, model, test_graph, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler")
    with pytest.warns(UserWarning) as warned:
        model_export.export_model(tmp_path, model.predictor.gnn, model.predictor.booster, _export_meta(model))
    for library in ("libforest.so", "libsage.so"):
        assert any(f"without {library}" in str(w.message) and "no C compiler" in str(w.message) for w in warned)
    version = tmp_path / TRITON_MODEL_NAME / "1"
    assert not (version / "libforest.so").exists() and not (version / "libsage.so").exists()
    again = model_export.load_model(tmp_path / TRITON_MODEL_NAME)
    assert again.predictor.tree_path == "no libforest.so in the version directory"
    assert again.predictor.gnn_path == "no libsage.so in the version directory"
    np.testing.assert_array_equal(again.predict(test_graph), model.predict(test_graph))
    small = test_graph.edges(np.arange(5))
    np.testing.assert_allclose(again.predict(small), model.predict(small), atol=1e-6)


def _export_meta(model) -> dict:
    return {k: v for k, v in model.meta.items() if k not in ("shap", "versions")}


# --- the compiled message passing (sage.c) -------------------------------------------------------

def _chunks(graph: graph_store.Graph, size: int) -> list[graph_store.Graph]:
    """The graph's edges ``size`` at a time, each part with only the nodes it touches."""
    return [graph_store.compact(graph.edges(np.arange(start, min(start + size, graph.num_edges))))
            for start in range(0, graph.num_edges, size)]


def _arrays(graph: graph_store.Graph) -> tuple[np.ndarray, ...]:
    return graph.x_user, graph.x_merchant, graph.edge_index.astype(np.int64), graph.edge_attr


def test_the_cpu_backend_runs_the_message_passing_of_small_requests_in_c(model):
    assert model.predictor.gnn_path.startswith("compiled message passing (libsage.so)")
    assert model.predictor.compiled_gnn is not None


@pytest.mark.parametrize("size", [1, 7, 64, None], ids=["1 edge", "7 edges", "64 edges", "whole graph"])
def test_the_compiled_message_passing_equals_torch_within_float32_rounding(model, test_graph, size):
    predictor = model.predictor
    for part in _chunks(test_graph, size or test_graph.num_edges):
        got, expected = predictor.compiled_gnn(*_arrays(part)), _features(model, part)
        assert got.dtype == np.float32 and got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        # and the trees see the same thing: the same probabilities
        np.testing.assert_allclose(predictor.predict_dense(got), predictor.predict_dense(expected), atol=1e-6)


def test_requests_up_to_max_edges_use_the_compiled_message_passing_and_larger_ones_torch(model, test_graph,
                                                                                          monkeypatch):
    predictor = model.predictor
    limit = type(predictor.compiled_gnn).MAX_EDGES
    assert test_graph.num_edges > limit + 1
    calls, compiled = [], predictor.compiled_gnn
    monkeypatch.setattr(predictor, "compiled_gnn", lambda *graph: calls.append(graph[2].shape[1]) or compiled(*graph))
    for n_edges in (1, limit, limit + 1, test_graph.num_edges):
        part = test_graph.edges(np.arange(n_edges))
        expected = predictor.predict_dense(_features(model, graph_store.compact(part)))
        np.testing.assert_allclose(model.predict(part), expected, atol=1e-6)
    assert calls == [1, limit]


@pytest.mark.parametrize("change, reason", [
    (lambda v: (v / "libsage.so").unlink(), "no libsage.so in the version directory"),
    (lambda v: (v / "libsage.so").write_bytes(b"not a shared library"), "libsage.so does not load here"),
    # Neighbour sums instead of means: the same on one-edge graphs, wrong on the larger probe graphs.
    (lambda v: _recompile(v, "sage.c", (v / "sage.c").read_text().replace("m[k] /= degree[d];", "")),
     "does not reproduce torch's message passing on probe graphs"),
], ids=["missing", "unloadable", "wrong"])
def test_without_a_trustworthy_compiled_message_passing_torch_serves(result, model, test_graph, tmp_path,
                                                                     change, reason):
    fallback = model_export.load_model(_package_variant(result, tmp_path, change))
    assert reason in fallback.predictor.gnn_path
    assert fallback.predictor.compiled_gnn is None
    for part in _chunks(test_graph, 5)[:10]:
        np.testing.assert_array_equal(fallback.predict(part), model.predictor.predict_dense(_features(model, part)))


def test_a_gnn_other_than_mean_sageconv_is_served_by_torch(model, tmp_path):
    meta = _export_meta(model)
    meta["architecture"] = {**meta["architecture"], "layer": "GraphConv"}
    gnn = type(model.predictor.gnn)(**meta["architecture"]).eval()
    model_export.export_model(tmp_path, gnn, model.predictor.booster, meta)
    other = model_export.load_model(tmp_path / TRITON_MODEL_NAME)
    assert other.predictor.gnn_path == "libsage.so supports plain mean SAGEConv layers only"
    assert other.predictor.tree_path.startswith("compiled trees")


@pytest.mark.parametrize("edges", [slice(0, 1), slice(3, 40), slice(None)])
def test_nodes_no_edge_touches_do_not_change_any_score(model, test_graph, edges):
    # The backend drops untouched nodes (all but a few for a one-transaction request);
    # scoring the compacted graph or the one with every node must agree exactly.
    part = test_graph.edges(np.arange(test_graph.num_edges)[edges])
    compacted = graph_store.compact(part)
    assert compacted.x_user.shape[0] <= part.x_user.shape[0]
    np.testing.assert_array_equal(model.predict(part), model.predict(compacted))


@pytest.mark.parametrize("n_edges", [40, None], ids=["compiled message passing", "torch"])
def test_scoring_chosen_edges_gives_their_scores_in_the_whole_graph(model, test_graph, n_edges):
    # A few rows scored inside a context of millions of edges: the messages pass over every
    # edge, the trees are walked for the chosen ones only.
    part = test_graph.edges(np.arange(n_edges or test_graph.num_edges))
    assert (part.num_edges > type(model.predictor.compiled_gnn).MAX_EDGES) == (n_edges is None)
    chosen = np.array([part.num_edges - 1, 0, 7, 7])
    np.testing.assert_array_equal(model.predict(part, chosen), model.predict(part)[chosen])
    assert model.predict(part, np.zeros(0, dtype=np.int64)).shape == (0,)
    with pytest.raises(ValueError, match=f"edges must be a list of edge positions in 0..{part.num_edges - 1}"):
        model.predict(part, np.array([part.num_edges]))


def test_a_large_request_is_scored_in_batches_with_the_same_scores(model, test_graph, monkeypatch):
    # Above BATCH_EDGES edges the trees' input is built and scored a batch at a time.
    predictor = model.predictor
    part = test_graph.edges(np.arange(test_graph.num_edges))
    assert part.num_edges > type(predictor.compiled_gnn).MAX_EDGES  # the torch path, as bulk requests take
    whole, chosen = model.predict(part), np.array([part.num_edges - 1, 0, 7, 7, 30])
    batches = []
    predict_dense = predictor.predict_dense
    monkeypatch.setattr(predictor, "predict_dense", lambda rows: batches.append(len(rows)) or predict_dense(rows))
    monkeypatch.setattr(sys.modules[type(predictor).__module__], "BATCH_EDGES", 7)

    np.testing.assert_array_equal(model.predict(part), whole)
    assert batches[:2] == [7, 7] and sum(batches) == part.num_edges and len(batches) == -(-part.num_edges // 7)
    batches.clear()
    np.testing.assert_array_equal(model.predict(part, chosen), whole[chosen])
    assert batches == [5]  # 5 chosen edges: one batch


def test_a_graph_without_edges_scores_to_nothing(model, test_graph):
    assert model.predict(test_graph.edges(np.zeros(test_graph.num_edges, dtype=bool))).shape == (0,)


def test_shapley_values_give_each_edge_one_value_per_feature_group(model, test_graph):
    shap = model.shapley(test_graph)
    groups = [len(np.unique(m)) for m in (test_graph.feature_mask_user, test_graph.feature_mask_merchant,
                                          test_graph.feature_mask_edge)]
    assert [v.shape for v in shap.values()] == [(test_graph.num_edges, n) for n in groups]
    assert all(np.abs(v).sum() > 0 for v in shap.values())


def test_shapley_values_add_up_to_the_change_from_the_all_zero_baseline(model, test_graph):
    shap = model.shapley(test_graph)
    zero = model.predictor.predict(np.zeros_like(test_graph.x_user), np.zeros_like(test_graph.x_merchant),
                                   test_graph.edge_index, np.zeros_like(test_graph.edge_attr))
    total = sum(v.sum(axis=1) for v in shap.values())
    np.testing.assert_allclose(total, model.predict(test_graph) - zero, atol=1e-5)


def test_shapley_groups_follow_the_masks_given(model, test_graph):
    one_group_each = {"feature_mask_user": np.zeros(test_graph.x_user.shape[1], np.int32),
                      "feature_mask_merchant": np.full(test_graph.x_merchant.shape[1], 7, np.int32),
                      "edge_feature_mask_user_to_merchant": np.arange(test_graph.edge_attr.shape[1], dtype=np.int32)}
    shap = model.shapley(test_graph, masks=one_group_each)
    assert [v.shape[1] for v in shap.values()] == [1, 1, test_graph.edge_attr.shape[1]]
    with pytest.raises(ValueError, match="feature_mask_user"):
        model.shapley(test_graph, masks={"feature_mask_user": np.zeros(2, np.int32)})


# --- served by the real Triton ----------------------------------------------------------------

BULK_VARIANT = "bulk_variant"  # the package with bulk_edges 10: the test graph is a bulk request


@pytest.fixture(scope="module")
def triton(result, tmp_path_factory):
    repository = tmp_path_factory.mktemp("triton") / "models"
    shutil.copytree(result.model_dir, repository / TRITON_MODEL_NAME)
    bulk = shutil.copytree(result.model_dir, repository / BULK_VARIANT) / "config.pbtxt"
    text = bulk.read_text().replace(f'name: "{TRITON_MODEL_NAME}"', f'name: "{BULK_VARIANT}"')
    bulk.write_text(text.replace('key: "bulk_edges"\n  value: { string_value: "1048576" }',
                                 'key: "bulk_edges"\n  value: { string_value: "10" }'))
    assert 'string_value: "10"' in bulk.read_text()
    with EmbeddedTriton(repository, repository.parent / "triton.log") as server:
        with server.client() as client:
            client.load_model(TRITON_MODEL_NAME)
            client.log_path = server.log_path
            yield client


@pytest.mark.skipif(training.usable_cores() < 2, reason="one core: a bulk request has no more threads to use")
def test_a_bulk_request_is_scored_with_every_core_and_gives_the_same_scores(triton, model, test_graph):
    triton.load_model(BULK_VARIANT)
    cores = training.usable_cores()
    small = test_graph.edges(np.arange(5))
    np.testing.assert_allclose(triton.infer(BULK_VARIANT, _contract_inputs(small))["PREDICTION"][:, 0],
                               model.predict(small), atol=1e-5)
    assert "bulk request" not in triton.log_path.read_text()  # 5 edges: a transaction's one thread
    out = triton.infer(BULK_VARIANT, _contract_inputs(test_graph))["PREDICTION"][:, 0]
    np.testing.assert_allclose(out, model.predict(test_graph), atol=1e-5)
    assert f"bulk request: {test_graph.num_edges} edges scored with {cores} threads" in triton.log_path.read_text()


def test_triton_predicts_what_the_in_process_model_predicts(triton, model, test_graph):
    out = triton.infer(TRITON_MODEL_NAME, _contract_inputs(test_graph))
    assert out["PREDICTION"].shape == (test_graph.num_edges, 1)
    np.testing.assert_allclose(out["PREDICTION"][:, 0], model.predict(test_graph), atol=1e-5)
    assert all(out[name].shape[0] == 0 for name in out if name.startswith("shap_values_"))


def test_triton_shapley_values_match_the_in_process_ones(triton, model, test_graph):
    out = triton.infer(TRITON_MODEL_NAME, _contract_inputs(test_graph, compute_shap=True))
    for name, values in model.shapley(test_graph).items():
        assert out[name].shape == values.shape
        assert np.abs(out[name]).sum() > 0
        np.testing.assert_allclose(out[name], values, atol=1e-5)


def test_triton_needs_only_the_graph_the_masks_and_flag_are_optional(triton, model, test_graph):
    graph_only = {k: v for k, v in _contract_inputs(test_graph).items()
                  if not k.startswith(("feature_mask", "edge_feature_mask", "COMPUTE_SHAP"))}
    out = triton.infer(TRITON_MODEL_NAME, graph_only, outputs=["PREDICTION"])
    np.testing.assert_allclose(out["PREDICTION"][:, 0], model.predict(test_graph), atol=1e-5)


def test_triton_answers_invalid_requests_with_an_error_and_keeps_serving(triton, test_graph):
    inputs = _contract_inputs(test_graph)
    bad_index = dict(inputs, edge_index_user_to_merchant=inputs["edge_index_user_to_merchant"] + 10_000)
    with pytest.raises(TritonError, match="edge_index_user_to_merchant row 0"):
        triton.infer(TRITON_MODEL_NAME, bad_index)
    nan_user = dict(inputs, x_user=np.where(np.arange(inputs["x_user"].size).reshape(inputs["x_user"].shape) == 0,
                                            np.nan, inputs["x_user"]).astype(np.float32))
    with pytest.raises(TritonError, match="x_user contains NaN"):
        triton.infer(TRITON_MODEL_NAME, nan_user)
    with pytest.raises(TritonError, match="x_merchant"):
        triton.infer(TRITON_MODEL_NAME, dict(inputs, x_merchant=inputs["x_merchant"][:, :-1]))
    with pytest.raises(TritonError, match="feature_mask_user"):
        triton.infer(TRITON_MODEL_NAME, dict(inputs, COMPUTE_SHAP=np.array([True]),
                                             feature_mask_user=np.zeros(1, np.int32)))
    assert triton.infer(TRITON_MODEL_NAME, inputs)["PREDICTION"].shape == (test_graph.num_edges, 1)


def test_the_serving_contracts_worked_example_reads_one_value_per_feature_group(triton, model, graph_dir,
                                                                                test_graph, capsys):
    """docs/serving_contract.md's tritonclient code, run as written against the served model."""
    import re

    doc = (project_root() / "docs" / "serving_contract.md").read_text()
    code = re.search(r"## Worked example.*?```python\n(.*?)```", doc, re.S).group(1)
    code, n = re.subn(r'^url, graph_dir = .*$', f"url, graph_dir = {triton.url!r}, {str(graph_dir)!r}", code,
                      flags=re.M)
    assert n == 1
    namespace: dict = {}
    exec(compile(code, "docs/serving_contract.md", "exec"), namespace)  # noqa: S102 - our own documentation

    np.testing.assert_allclose(namespace["probability"], model.predict(test_graph), atol=1e-5)
    top = namespace["top"]
    lone = test_graph.edges(np.arange(test_graph.num_edges) == top)
    expected = model.shapley(lone)
    printed = capsys.readouterr().out.splitlines()
    for output, groups in namespace["names"].items():
        mask = {"shap_values_user": test_graph.feature_mask_user, "shap_values_merchant":
                test_graph.feature_mask_merchant, "shap_values_user_to_merchant": test_graph.feature_mask_edge}[output]
        assert namespace["alone"][output].shape == (1, len(np.unique(mask))) == (1, len(groups))
        np.testing.assert_allclose(namespace["alone"][output], expected[output], atol=1e-5)
        assert any(line.startswith(output + " {") for line in printed)
