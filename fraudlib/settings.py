"""Names and default locations, in one place.

Every module that needs the Triton model name, the MLflow experiment or registered-model
name, an alias, or a default path under ``runs/`` reads it from here.
"""

from __future__ import annotations

import os
from pathlib import Path

# Triton: the blueprint 2.0.0 serving contract's model name.
TRITON_MODEL_NAME = "prediction_and_shapley"

# MLflow names.
EXPERIMENT_NAME = "fraud-gnn-xgboost"
REGISTERED_MODEL_NAME = "fraud-gnn-xgboost"
CHAMPION_ALIAS = "champion"
CHALLENGER_ALIAS = "challenger"
PREVIOUS_CHAMPION_ALIAS = "previous-champion"


def project_root() -> Path:
    return Path(__file__).resolve().parent.parent


def runs_root() -> Path:
    """Root of all run outputs: ``$FRAUD_RUNS_DIR`` or ``<project>/runs``."""
    return Path(os.environ.get("FRAUD_RUNS_DIR", project_root() / "runs")).resolve()


def mlflow_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` when set, else the embedded SQLite store under runs/."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{runs_root() / 'mlflow.db'}"


def mlflow_artifact_root() -> Path:
    return runs_root() / "mlartifacts"


def triton_model_repository() -> Path:
    """``$TRITON_MODEL_REPO`` when set, else the embedded repository under runs/."""
    repo = os.environ.get("TRITON_MODEL_REPO")
    return Path(repo).resolve() if repo else runs_root() / "triton_repository"


def run_folder(run_dir: str | Path | None) -> Path:
    """A notebook's run folder: the runner's ``run_dir``, or ``runs/scratch`` when opened alone."""
    folder = Path(run_dir) if run_dir else runs_root() / "scratch"
    folder.mkdir(parents=True, exist_ok=True)
    return folder.resolve()
