"""MLflow on a real SQLite store: training runs, the model that travels, the registry's aliases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fraudlib import graph_store, model_export, registry, scoring, settings, tracking, training
from fraudlib.preprocess import preprocess, read_test_rows
from test_training import FAST_XGB

REPO = Path(__file__).resolve().parent.parent


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
def trained(store, synthetic_csv, tmp_path_factory):
    graph_dir = tmp_path_factory.mktemp("graph") / "graph"
    preprocess(synthetic_csv, graph_dir)  # the default (causal) features: scoring needs the history
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


def new_rows(synthetic_csv) -> pd.DataFrame:
    """Raw rows of the test period as a user holds them (text, no label): new transactions."""
    raw = pd.read_csv(synthetic_csv, dtype=str, keep_default_na=False)
    return raw[raw["Year"].astype(int) >= 2019].head(40).drop(columns=["Is Fraud?"]).reset_index(drop=True)


def test_the_training_run_records_its_data_and_its_notebook(trained):
    graph_dir, _, run_id = trained
    run = tracking.configure().get_run(run_id)
    assert run.data.tags["mlflow.source.name"].endswith("notebooks/02_train.ipynb")
    experiment = tracking.configure().get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's classic view
    (dataset,) = run.inputs.dataset_inputs
    assert [t.value for t in dataset.tags if t.key == "mlflow.data.context"] == ["training"]
    assert json.loads(dataset.dataset.profile)["num_rows"] == graph_store.read_part(graph_dir, "train").num_edges
    assert dataset.dataset.source == json.dumps({"uri": str(graph_dir.resolve())})
    assert dataset.dataset.digest == graph_store.manifest_hash(graph_dir)[:12]  # the graph it was trained on
    columns = [c["name"] for c in json.loads(dataset.dataset.schema)["mlflow_colspec"]]
    assert columns[-4:] == ["user", "merchant", "split", "Fraud"] and len(columns) > 4


def test_the_dataset_schema_is_the_one_mlflow_infers_without_testing_each_value():
    from mlflow.types.utils import _infer_schema

    frame = pd.DataFrame({"f": np.arange(3000, dtype=np.float32), "gap": np.r_[np.zeros(2999), np.nan],
                          "user": np.arange(3000), "split": np.array(["train", "validation"] * 1500),
                          "Fraud": np.zeros(3000, dtype=np.int64)})
    assert tracking._frame_schema(frame) == _infer_schema(frame)
    assert not tracking._frame_schema(frame).inputs[1].required  # its one NaN is past the first rows


def test_the_logged_model_declares_raw_rows_pinned_requirements_and_carries_its_context(trained):
    import mlflow.models

    _, _, run_id = trained
    uri = tracking.pyfunc_model_uri(run_id)
    info = mlflow.models.get_model_info(uri)
    inputs = {c["name"]: c for c in info.signature.inputs.to_dict()}
    assert list(inputs) == list(scoring.COLUMNS)
    assert all(c["type"] == "string" for c in inputs.values())
    assert [n for n, c in inputs.items() if not c["required"]] == ["Is Fraud?"]
    assert "fraud_probability" in info.signature.outputs.input_names()
    # The declared output is what MLflow infers from what scoring returns.
    graph_dir, result, _ = trained
    rows = scoring.raw_rows(read_test_rows(graph_dir).head(5).drop(columns=[scoring.LABEL]))
    scored = scoring.score_in_process(model_export.load_model(result.model_dir), scoring.parse_raw(rows), graph_dir)
    assert info.signature.outputs == mlflow.models.infer_signature(rows, scored).outputs
    local = Path(mlflow.artifacts.download_artifacts(uri))
    example = json.loads((local / "serving_input_example.json").read_text())["dataframe_split"]
    assert example["columns"] == [c for c in scoring.COLUMNS if c != "Is Fraud?"] and example["data"]

    required = (local / "requirements.txt").read_text().split()
    pinned = {line.split("==")[0]: line.split("==")[1].split("+")[0].split()[0]
              for line in (REPO / "requirements.txt").read_text().splitlines() if "==" in line}
    for name in ("torch", "torch-geometric", "mlflow", "numpy", "xgboost-cpu"):
        assert f"{name}=={pinned[name]}" in required
    assert not [r for r in required if r.startswith("fraudlib")]
    assert (local / "code" / "fraudlib" / "scoring.py").is_file()
    context = local / "artifacts" / "scoring_context"
    for name in ("encoders.json", "history.parquet", "gnn/test_gnn/edges/user_to_merchant.csv"):
        assert (context / name).is_file(), name


def test_a_model_that_cannot_score_its_input_example_is_not_logged_as_if_it_could(trained, monkeypatch):
    # MLflow scores the example with the logged model and only warns when that fails.
    graph_dir, result, _ = trained

    def broken(self, context, model_input, params=None):
        raise ValueError("the model's scoring context is unreadable")

    monkeypatch.setattr(tracking.TransactionScorer, "predict", broken)
    with pytest.raises(RuntimeError, match="could not score its input example .*scoring context is unreadable"):
        tracking.log_training_run(
            experiment=settings.EXPERIMENT_NAME, run_name="broken", gnn_params={}, xgb_params={}, metrics={},
            model_dir=result.model_dir, config={}, tags={"graph_dir": str(graph_dir)})


def test_the_champion_loads_and_scores_elsewhere_without_the_training_machines_files(
        trained, store, synthetic_csv, tmp_path):
    """A fresh process in another folder, with another runs folder and the graph directory and
    model package gone, loads the registry's champion and scores raw rows as fraudlib does here."""
    graph_dir, result, run_id = trained
    champion = registry.register(run_id, triton_version=7, manifest_hash=None)
    registry.promote(champion.version)
    rows = new_rows(synthetic_csv)
    expected = scoring.score_in_process(model_export.load_model(result.model_dir), scoring.parse_raw(rows),
                                        graph_dir)
    assert expected["fraud_probability"].notna().sum() >= 20
    sampled = scoring.score_in_process(model_export.load_model(result.model_dir), scoring.parse_raw(rows),
                                       graph_dir, fanout=3)
    assert not np.allclose(sampled["fraud_probability"], expected["fraud_probability"], equal_nan=True)
    (tmp_path / "rows.csv").write_text(rows.to_csv(index=False))
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "runs").mkdir(parents=True)
    script = (
        "import sys, mlflow.pyfunc, pandas as pd\n"
        f"model = mlflow.pyfunc.load_model('models:/{settings.REGISTERED_MODEL_NAME}@champion')\n"
        "import fraudlib\n"
        "print(fraudlib.__file__)\n"
        "rows = pd.read_csv(sys.argv[1], dtype=str, keep_default_na=False)\n"
        "model.predict(rows).to_parquet(sys.argv[2])\n"
        "model.predict(rows, params={'fanout': 3}).to_parquet(sys.argv[3])\n")
    env = {**os.environ, "FRAUD_RUNS_DIR": str(elsewhere / "runs"),
           "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri(), "PYTHONPATH": ""}
    away = [graph_dir, result.model_dir.parent]
    for path in away:
        path.rename(path.with_name(path.name + ".away"))
    try:
        done = subprocess.run([sys.executable, "-c", script, *(str(tmp_path / f) for f in ("rows.csv", "out.parquet",
                                                                                             "sampled.parquet"))],
                              cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    finally:
        for path in away:
            path.with_name(path.name + ".away").rename(path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "/artifacts/code/fraudlib/" in done.stdout  # the fraudlib shipped with the model
    got = pd.read_parquet(tmp_path / "out.parquet")
    assert len(got) == len(rows)
    np.testing.assert_allclose(got["fraud_probability"].to_numpy(), expected["fraud_probability"].to_numpy(),
                               rtol=1e-5, atol=1e-6)
    # With a fanout: each row in a sample of its receptive field, as fraudlib samples it here.
    np.testing.assert_allclose(pd.read_parquet(tmp_path / "sampled.parquet")["fraud_probability"].to_numpy(),
                               sampled["fraud_probability"].to_numpy(), rtol=1e-5, atol=1e-6)
    assert not list((elsewhere / "runs").iterdir())


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


def test_the_fast_registry_reader_agrees_with_mlflow_and_status_shows_the_last_rejection(trained, store):
    """`fraud status` reads the registry without MLflow's client: the same versions, aliases and
    tags; and it names the champion, the challenger and the last rejected version with its reason."""
    _, _, run_id = trained
    rejected = registry.register(run_id, triton_version=11, manifest_hash=None)
    registry.tag_version(rejected.version, registry.REJECTED_TAG, "not better than the champion")
    reason = "AUPRC interval of challenger - champion [-0.02, 0.01] does not clear min_improvement 0"
    tracking.set_tags(run_id, {registry.REASON_TAG: reason})
    staged = registry.register(run_id, triton_version=12, manifest_hash=None)
    registry.mark_challenger(staged.version)

    fast = registry.read_versions()
    assert fast == registry.versions() and len(fast) >= 3
    assert registry.last_rejected(fast).version == rejected.version and registry.last_rejected(fast).reason == reason

    env = {**os.environ, "FRAUD_RUNS_DIR": str(store), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([str(Path(sys.executable).parent / "fraud"), "status"], env=env, capture_output=True,
                          text=True, timeout=60)
    champion = registry.champion()
    assert f"  champion: version {champion.version} (Triton v{champion.triton_version}" in done.stdout
    assert f"  challenger: version {staged.version} (Triton v12" in done.stdout
    assert f"  last rejected: version {rejected.version} (Triton v11, run {run_id}): {reason}" in done.stdout
    # No Triton repository under this runs folder: the registry's champion is not on disk.
    assert done.returncode == 1 and "INCONSISTENT: the repository serves version None" in done.stdout
    registry.clear_challenger()


def test_the_fast_reader_reads_a_tracking_server_over_rest_as_the_store_itself(trained, store, tmp_path):
    """A real `mlflow server` on the same store: the REST reader gives the SQLite reader's answer."""
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", settings.mlflow_tracking_uri(),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
                time.sleep(0.5)
        over_rest = registry.read_versions(uri=f"http://127.0.0.1:{port}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    direct = registry.read_versions()
    assert over_rest == direct and any(v.aliases for v in direct)
    assert [v.reason for v in over_rest] == [v.reason for v in direct] and any(v.reason for v in direct)
    with pytest.raises(RuntimeError, match=f"MLflow server at http://127.0.0.1:{port} is not reachable"):
        registry.read_versions(uri=f"http://127.0.0.1:{port}")
