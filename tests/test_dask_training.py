"""Training with engine="dask": XGBoost through xgboost.dask on real Dask processes (a
LocalCluster, and a `dask scheduler` with two `dask worker`s), the same model quality and
package as in-process, the engine chosen by the stage, an unreachable cluster refused early."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fraudlib import dask_engine, graph_store, model_export, training
from fraudlib.stages import train as stage
from test_dask_engine import cluster_address, dask_processes  # noqa: F401 - fixtures and helpers shared
from test_flow import free_port
from test_training import FAST_XGB, write_planted_graph

GNN = {"num_epochs": 30, "hidden_channels": 16}


@pytest.fixture(scope="module")
def graph_dir(tmp_path_factory):
    return write_planted_graph(tmp_path_factory.mktemp("graph") / "graph")


@pytest.fixture(scope="module")
def in_process(graph_dir, tmp_path_factory) -> training.TrainResult:
    return training.train(graph_dir, tmp_path_factory.mktemp("pandas"), GNN, FAST_XGB, device="cpu",
                          progress=False)


@pytest.fixture(scope="module")
def on_dask(graph_dir, cluster_address, tmp_path_factory) -> training.TrainResult:  # noqa: F811
    return training.train(graph_dir, tmp_path_factory.mktemp("dask"), GNN, FAST_XGB, device="cpu",
                          progress=False, engine="dask", scheduler_address=cluster_address)


def test_xgboost_on_dask_reaches_the_in_process_quality(in_process, on_dask):
    assert on_dask.engine == "dask" and in_process.engine == "pandas"
    for model, by_split in in_process.metrics.items():
        for split in ("validation", "test"):
            assert on_dask.metrics[model][split]["auprc"] == pytest.approx(by_split[split]["auprc"], abs=0.02), \
                (model, split)
    assert set(on_dask.boosters) == set(in_process.boosters)


def test_on_one_worker_xgboost_dask_gives_the_in_process_booster_byte_for_byte():
    from distributed import Client, LocalCluster

    rng = np.random.default_rng(0)
    x = {split: rng.normal(size=(n, 6)).astype(np.float32)
         for split, n in (("train", 4000), ("validation", 1500), ("test", 1500))}
    y = {split: (v[:, 0] + 0.5 * v[:, 1] + rng.normal(size=len(v)) > 1.5).astype(np.int64) for split, v in x.items()}
    test = x["test"]
    x["test"] = training.EdgeBatches(len(test), lambda start, stop: test[start:stop])
    settings = training.XGBSettings(num_boost_round=200)
    here, here_scores = training._fit_xgboost(x, y, settings, "cpu", 42)
    with LocalCluster(n_workers=1, threads_per_worker=training.usable_cores(), processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as local, Client(local, set_as_default=False) as client:
        cluster = dask_engine.Cluster(client, local.scheduler_address, "", "one worker")
        there, there_scores = training._fit_xgboost(x, y, settings, "cpu", 42, cluster)

    # Early stopping on validation cut both at the same best round, well before the last.
    assert there.num_boosted_rounds() == here.num_boosted_rounds() < 200 - training.EARLY_STOPPING_ROUNDS
    assert there.save_raw() == here.save_raw()
    np.testing.assert_array_equal(there_scores["test"], here_scores["test"])


def test_the_dask_trained_package_loads_in_the_triton_package_path_and_scores_as_trained(on_dask, graph_dir):
    model = model_export.load_model(on_dask.model_dir)
    test = graph_store.read_part(graph_dir, "test")

    np.testing.assert_allclose(model.predict(test), on_dask.test_scores["gnn_xgboost"], atol=1e-6)
    assert sorted(p.name for p in (on_dask.model_dir / "1").iterdir()) == sorted(
        model_export.FILES + model_export.NATIVE_FILES)


def test_triton_serves_the_dask_trained_package_and_predicts_its_test_scores(on_dask, graph_dir, tmp_path):
    import shutil

    from fraudlib.settings import TRITON_MODEL_NAME
    from fraudlib.triton_server import EmbeddedTriton
    from test_model_export import _contract_inputs

    repository = tmp_path / "models"
    shutil.copytree(on_dask.model_dir, repository / TRITON_MODEL_NAME)
    test = graph_store.read_part(graph_dir, "test")
    with EmbeddedTriton(repository, tmp_path / "triton.log") as server, server.client() as client:
        client.load_model(TRITON_MODEL_NAME)
        out = client.infer(TRITON_MODEL_NAME, _contract_inputs(test), outputs=["PREDICTION"])

    np.testing.assert_allclose(out["PREDICTION"][:, 0], on_dask.test_scores["gnn_xgboost"], atol=1e-5)


def test_the_result_says_how_large_the_graph_was_and_the_peak_memory(on_dask, in_process, graph_dir):
    train_part = graph_store.read_part(graph_dir, "train")
    assert on_dask.graph_size == in_process.graph_size == {
        "nodes": {"user": 400, "merchant": 200},
        "edges": {"train": int((train_part.split == "train").sum()),
                  "validation": int((train_part.split == "validation").sum()),
                  "test": graph_store.read_part(graph_dir, "test").num_edges},
        "feature_dims": {"user": 9, "merchant": 12, "edge": 5}}
    assert set(in_process.peak_memory) == {"process"} and in_process.peak_memory["process"] > 100e6
    assert set(on_dask.peak_memory) == {"process", "workers"} and on_dask.peak_memory["workers"] > 50e6


def test_engine_auto_takes_dask_by_the_preprocess_rule_on_the_manifest_rows(tmp_path):
    graph = write_planted_graph(tmp_path / "graph", n_users=20, n_merchants=10)
    assert training.choose_engine("auto", graph) == "pandas"  # a manifest without row counts
    for rows, engine in ((dask_engine.AUTO_DASK_ROWS, "pandas"), (dask_engine.AUTO_DASK_ROWS + 1, "dask")):
        graph_store.write_json(graph / graph_store.MANIFEST, {"rows": {"read": rows}})
        assert training.choose_engine("auto", graph) == engine
    assert training.choose_engine("pandas", graph) == "pandas"
    assert stage.ENGINES == training.ENGINES == dask_engine.ENGINES
    engine_help = next(f for f in dataclasses.fields(stage.Params) if f.name == "engine").metadata["help"]
    assert f"{dask_engine.AUTO_DASK_ROWS:,}" in engine_help
    with pytest.raises(ValueError, match="engine must be one of"):
        training.train(graph, tmp_path / "out", engine="spark", progress=False)


def test_an_unreachable_scheduler_is_a_clear_error_before_any_work(graph_dir, monkeypatch, tmp_path):
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("FRAUD_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv(dask_engine.ADDRESS_ENV, address)

    with pytest.raises(dask_engine.ClusterError, match="cannot reach the Dask scheduler at 'tcp://127.0.0.1"):
        training.train(graph_dir, tmp_path / "out", engine="dask", progress=False)
    with pytest.raises(dask_engine.ClusterError, match="cannot reach the Dask scheduler"):
        stage.run(stage.Params(graph_dir=str(graph_dir), engine="dask", run_dir=str(tmp_path / "runs" / "run-1")))

    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "runs" / "run-1" / "model").exists()


def test_the_stage_trains_on_a_dask_scheduler_and_two_worker_processes(synthetic_csv, monkeypatch, tmp_path):
    from fraudlib.preprocess import preprocess

    monkeypatch.setenv("FRAUD_RUNS_DIR", str(tmp_path / "runs"))
    graph = tmp_path / "graph"
    preprocess(synthetic_csv, graph)
    with dask_processes(tmp_path) as (address, _):
        outputs = stage.run(stage.Params(graph_dir=str(graph), run_dir=str(tmp_path / "runs" / "run-1"),
                                         engine="dask", scheduler_address=address, device="cpu", num_epochs=2,
                                         num_boost_round=FAST_XGB["num_boost_round"], num_parallel_tree=1))

    assert outputs.engine == "dask" and 0.0 < outputs.test_auprc <= 1.0
    assert f"dask on an existing cluster at {address}, 2 workers" in outputs.summary
    size = outputs.graph_size
    assert f"| graph size | {size['nodes']['user']:,} users, {size['nodes']['merchant']:,} merchants; edges: train " \
        in outputs.summary and "GB the Dask workers" in outputs.summary
    manifest = graph_store.read_manifest(graph)
    assert size["feature_dims"] == manifest["dims"] and size["nodes"] == manifest["nodes"]
    assert size["edges"] == {split: manifest["splits"][split]["edges"] for split in ("train", "validation", "test")}
    table = stage.size_table(outputs)
    assert table.loc["user nodes", "value"] == f"{size['nodes']['user']:,}" and "peak RSS, workers" in table.index
    model_export.load_model(outputs.model_dir)  # the package the evaluate stage stages in Triton
