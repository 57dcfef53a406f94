"""MLflow on a real SQLite store: training runs, the pyfunc model, the registry's aliases."""

from __future__ import annotations

import numpy as np
import pytest

from fraudlib import graph_store, model_export, registry, settings, tracking, training
from test_training import FAST_XGB, write_planted_graph


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    mp = pytest.MonkeyPatch()
    mp.setenv("FRAUD_RUNS_DIR", str(root))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    graph_dir = write_planted_graph(tmp_path_factory.mktemp("graph") / "graph", n_users=120, n_merchants=60)
    result = training.train(graph_dir, tmp_path_factory.mktemp("out"), {"num_epochs": 3}, FAST_XGB,
                            device="cpu", progress=False)
    run_id = tracking.log_training_run(
        experiment=settings.EXPERIMENT_NAME, run_name="test", gnn_params={"num_epochs": 3},
        xgb_params=FAST_XGB, metrics={"test_auprc": result.metrics["gnn_xgboost"]["test"]["auprc"]},
        model_dir=result.model_dir, config={"graph_dir": str(graph_dir)},
        tags={"graph_dir": str(graph_dir), "model_dir": str(result.model_dir.resolve())})
    return graph_dir, result, run_id


def test_training_run_records_params_metrics_and_the_model_package(trained):
    _, result, run_id = trained
    run = tracking.configure().get_run(run_id)
    assert run.data.params["gnn.num_epochs"] == "3"
    assert "test_auprc" in run.data.metrics
    artifacts = {a.path for a in tracking.configure().list_artifacts(run_id, tracking.MODEL_DIR_ARTIFACT_PATH)}
    assert f"{tracking.MODEL_DIR_ARTIFACT_PATH}/config.pbtxt" in artifacts


def test_the_embedded_store_lives_under_the_runs_folder(store, trained):
    assert settings.mlflow_tracking_uri() == f"sqlite:///{store / 'mlflow.db'}"
    assert (store / "mlflow.db").is_file() and (store / "mlartifacts").is_dir()


def test_pyfunc_model_scores_a_graph_directory_outside_triton_like_the_package(trained):
    import mlflow.pyfunc
    import pandas as pd

    graph_dir, result, run_id = trained
    scorer = mlflow.pyfunc.load_model(tracking.pyfunc_model_uri(run_id))
    scored = scorer.predict(pd.DataFrame({"graph_dir": [str(graph_dir)]}))
    expected = model_export.load_model(result.model_dir).predict(graph_store.read_part(graph_dir, "test"))
    np.testing.assert_allclose(scored["score"].to_numpy(), expected, rtol=1e-5, atol=1e-6)


def test_registry_moves_champion_and_keeps_the_previous_one(trained):
    graph_dir, _, run_id = trained
    first = registry.register(run_id, triton_version=1, manifest_hash=graph_store.manifest_hash(graph_dir))
    registry.promote(first.version)
    second = registry.register(run_id, triton_version=2, manifest_hash=None)
    registry.mark_challenger(second.version)
    assert registry.by_alias(settings.CHALLENGER_ALIAS).version == second.version
    registry.promote(second.version)
    assert registry.champion().version == second.version and registry.champion().triton_version == 2
    assert registry.by_alias(settings.PREVIOUS_CHAMPION_ALIAS).version == first.version
    assert registry.by_alias(settings.CHALLENGER_ALIAS) is None
    assert registry.for_run(run_id).version == second.version


def test_evaluation_metrics_and_decision_are_logged_to_the_training_run(trained):
    _, _, run_id = trained
    registry.log_evaluation(run_id, {"f1": 0.6}, {"f1": 0.5}, "promote", "better")
    run = tracking.configure().get_run(run_id)
    assert run.data.metrics["challenger_f1"] == 0.6 and run.data.metrics["champion_f1"] == 0.5
    assert run.data.metrics["f1_delta"] == pytest.approx(0.1)
    assert run.data.tags["promotion_decision"] == "promote"
