"""MLflow tracking: the embedded store, experiments, training runs and the pyfunc model.

The embedded default is a SQLite store under ``runs/`` with artifacts beside it, so no
server is needed; ``MLFLOW_TRACKING_URI`` points everything at a real server instead.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import pandas as pd
from mlflow.tracking import MlflowClient

from fraudlib import settings

PYFUNC_ARTIFACT_PATH = "model"
MODEL_DIR_ARTIFACT_PATH = "triton_model"


def configure():
    """Point MLflow at the configured store and return a client for it."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = settings.mlflow_tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(name: str = settings.EXPERIMENT_NAME) -> str:
    """The experiment's id, created on first use with artifacts under runs/ for the embedded store."""
    client = configure()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if settings.mlflow_tracking_uri().startswith("sqlite:"):
        root = settings.mlflow_artifact_root()
        root.mkdir(parents=True, exist_ok=True)
        location = root.as_uri()
    return client.create_experiment(name, artifact_location=location)


def _flatten(prefix: str, params: dict[str, Any]) -> dict[str, str]:
    return {f"{prefix}.{key}": str(value) for key, value in params.items()}


class GraphDirScorer(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: scores every edge of a graph directory with one model version.

    Input: a DataFrame with a ``graph_dir`` column (optional ``part``: "test", the default,
    or "train"). Output: one row per edge with its score.
    """

    def load_context(self, context):
        from fraudlib.model_export import load_model

        self.model = load_model(Path(context.artifacts["version_dir"]))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from fraudlib.graph_store import read_part

        frames = []
        for row in model_input.to_dict("records"):
            graph = read_part(row["graph_dir"], row.get("part") or "test")
            frames.append(pd.DataFrame({
                "graph_dir": str(row["graph_dir"]),
                "edge": range(graph.num_edges),
                "user": graph.edge_index[0],
                "merchant": graph.edge_index[1],
                "label": graph.label,
                "score": self.model.predict(graph),
            }))
        return pd.concat(frames, ignore_index=True)


def log_training_run(
    *,
    experiment: str,
    run_name: str,
    gnn_params: dict[str, Any],
    xgb_params: dict[str, Any],
    metrics: dict[str, float],
    model_dir: Path,
    config: dict[str, Any],
    plots: dict[str, Path] | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Log one training run (params, metrics, model package, config, plots, pyfunc); return its id."""
    experiment_id = ensure_experiment(experiment)
    model_dir = Path(model_dir)
    version_dir = model_dir / "1"
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as run:
        mlflow.set_tags({"stage": "train", **(tags or {})})
        mlflow.log_params({**_flatten("gnn", gnn_params), **_flatten("xgb", xgb_params)})
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})
        mlflow.log_artifacts(str(model_dir), artifact_path=MODEL_DIR_ARTIFACT_PATH)
        with tempfile.TemporaryDirectory() as tmp:
            config_path = Path(tmp) / "train_config.json"
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
            mlflow.log_artifact(str(config_path))
        for name, path in (plots or {}).items():
            mlflow.log_artifact(str(path), artifact_path="plots")
        mlflow.pyfunc.log_model(
            name=PYFUNC_ARTIFACT_PATH,
            python_model=GraphDirScorer(),
            artifacts={"version_dir": str(version_dir)},
            code_paths=[str(Path(__file__).resolve().parent)],
        )
        return run.info.run_id


def log_metrics(run_id: str, metrics: dict[str, float]) -> None:
    client = configure()
    for key, value in metrics.items():
        if value is not None:
            client.log_metric(run_id, key, float(value))


def set_tags(run_id: str, tags: dict[str, str]) -> None:
    client = configure()
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))


def pyfunc_model_uri(run_id: str) -> str:
    """The URI of the pyfunc model logged by :func:`log_training_run` in that run."""
    client = configure()
    models = client.search_logged_models(
        experiment_ids=[client.get_run(run_id).info.experiment_id],
        filter_string=f"source_run_id = '{run_id}'",
    )
    if models:
        return f"models:/{models[0].model_id}"
    return f"runs:/{run_id}/{PYFUNC_ARTIFACT_PATH}"


def log_artifact(run_id: str, path: Path | str, artifact_path: str | None = None) -> None:
    configure().log_artifact(run_id, str(path), artifact_path)
