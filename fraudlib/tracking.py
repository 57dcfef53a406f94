"""MLflow tracking: the embedded store, experiments, training runs and the pyfunc model.

The embedded default is a SQLite store under ``runs/`` with artifacts beside it, so no
server is needed; ``MLFLOW_TRACKING_URI`` points everything at a real server instead.

The model a training run logs travels: :class:`TransactionScorer` scores raw TabFormer rows
from its own artifacts (the Triton model package, and the scoring context of the graph it was
trained on: encoders, history, the test graph), with fraudlib shipped in it (``code_paths``),
pinned requirements, a signature and an input example.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import pandas as pd
from mlflow.tracking import MlflowClient

from fraudlib import settings

log = logging.getLogger(__name__)

PYFUNC_ARTIFACT_PATH = "model"
MODEL_DIR_ARTIFACT_PATH = "triton_model"
TRAIN_NOTEBOOK = "notebooks/02_train.ipynb"
# MLflow 3's UI opens an experiment in its GenAI view unless the experiment's kind says it is
# classic model development (the UI's own tag and value; the URL's ?workflowType=machine_learning
# switches the view too).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# What the logged model imports (through the fraudlib it ships), pinned at the versions that
# trained it (requirements.txt's pins in the project's venv). The first installed name of each
# tuple is used (xgboost-cpu in the pinned CPU venv, xgboost in the conda/GPU one).
MODEL_REQUIREMENTS = (("mlflow",), ("numpy",), ("pandas",), ("pyarrow",), ("torch",), ("torch-geometric",),
                      ("xgboost-cpu", "xgboost"), ("captum",), ("xxhash",))
INPUT_EXAMPLE_ROWS = 5


def configure():
    """Point MLflow at the configured store and return a client for it."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # Progress bars of artifact copies fill notebook outputs with frames (the store is local).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
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
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id
    location = None
    if settings.mlflow_tracking_uri().startswith("sqlite:"):
        root = settings.mlflow_artifact_root()
        root.mkdir(parents=True, exist_ok=True)
        location = root.as_uri()
    return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


def _flatten(prefix: str, params: dict[str, Any]) -> dict[str, str]:
    return {f"{prefix}.{key}": str(value) for key, value in params.items()}


class TransactionScorer(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: fraud probabilities of raw TabFormer rows, scored in their graph context.

    Input: a DataFrame of raw rows as text, the file's 15 columns (``pd.read_csv(path,
    dtype=str)``; ``Is Fraud?`` optional). Output: one row per input row (``scoring.score_frame``).
    Parameter ``fanout`` (default 0: each row's whole receptive field): score each row in a
    sample of it, at most this many edges of each node at each hop (``scoring.sampled_field``).
    Everything it reads is in its artifacts: ``model_version`` (the Triton model package's
    version folder) and ``scoring_context`` (encoders, history and test graph of its data).
    """

    def load_context(self, context):
        from fraudlib.model_export import load_model

        self.model = load_model(Path(context.artifacts["model_version"]))
        self.context_dir = Path(context.artifacts["scoring_context"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from fraudlib import scoring

        fanout = int((params or {}).get("fanout") or 0) or None
        return scoring.score_in_process(self.model, scoring.parse_raw(model_input), self.context_dir, fanout)


def model_requirements() -> list[str]:
    """``name==version`` of what the logged model imports, as installed here (local version
    labels such as ``+cpu`` dropped, so the CUDA and CPU wheels both satisfy them)."""
    pins = []
    for names in MODEL_REQUIREMENTS:
        for name in names:
            try:
                pins.append(f"{name}=={importlib.metadata.version(name).split('+')[0]}")
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        else:
            raise RuntimeError(f"none of {names} is installed: the model's requirements cannot be pinned")
    return pins


def scoring_context(graph_dir: Path, dest: Path) -> Path:
    """Copy what scoring new rows reads from ``graph_dir`` (``scoring.CONTEXT_FILES``) to ``dest``."""
    from fraudlib.scoring import CONTEXT_FILES

    for name in CONTEXT_FILES:
        source, target = graph_dir / name, dest / name
        if source.is_dir():
            shutil.copytree(source, target)
        elif source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        elif name not in ("history.parquet", "test_edges.parquet"):  # causal features only; older graphs
            raise FileNotFoundError(f"{source} is missing: the model cannot carry its scoring context "
                                    f"(is {graph_dir} a preprocessed graph directory?)")
    return dest


@contextmanager
def _quiet_mlflow():
    """MLflow's advice that does not apply here stays out of the audit notebooks: the source
    path's two readings (both local), integer columns that may miss values (ids never do), a
    pickled python_model (our own class, shipped with its code)."""
    logger = logging.getLogger("mlflow.pyfunc")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\.")
            yield
    finally:
        logger.setLevel(level)


def _log_training_data(graph_dir: Path) -> None:
    """The training edges (features, label, split) as the run's MLflow dataset input."""
    import mlflow.data

    from fraudlib.graph_store import manifest_hash, read_part

    train = read_part(graph_dir, "train")
    frame = pd.DataFrame(train.edge_attr, columns=train.edge_features)
    frame["user"], frame["merchant"] = train.edge_index[0], train.edge_index[1]
    frame["split"], frame["Fraud"] = train.split.astype(str), train.label
    digest = (manifest_hash(graph_dir) or "")[:12]
    # The digest is the graph's manifest hash when it has one: MLflow's own tests the type of
    # every value of the frame in Python (10 s at 100M rows' 1.27M training edges).
    dataset = mlflow.data.from_pandas(frame, source=str(graph_dir.resolve()), targets="Fraud",
                                      name=f"{graph_dir.name}-train{'-' + digest if digest else ''}",
                                      digest=digest or None)
    dataset.schema = _frame_schema(frame)  # instead of MLflow's inference: a Python test per value (57 s at full size)
    mlflow.log_input(dataset, context="training")


def _frame_schema(frame: pd.DataFrame):
    """The MLflow schema that ``PandasDataset`` infers (column types from the first rows; a
    column is required when it holds no missing value), with the missing values found by
    pandas over whole columns."""
    from mlflow.models import infer_signature
    from mlflow.types import ColSpec, Schema

    missing = frame.isna().any()
    return Schema([ColSpec(spec.type, spec.name, required=not missing[spec.name])
                   for spec in infer_signature(frame.head(1000)).inputs.inputs])


def _log_model(version_dir: Path, graph_dir: Path) -> None:
    """The travelling pyfunc, with its example: raw test rows without a label (new
    transactions). MLflow scores the example with the logged model as it will be loaded (its
    copied code and artifacts); a failure there, only a warning in MLflow, fails the logging."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    from fraudlib import scoring
    from fraudlib.preprocess import read_test_rows

    with tempfile.TemporaryDirectory(prefix="fraud-scoring-context-") as tmp:
        context_dir = scoring_context(graph_dir, Path(tmp) / "scoring_context")
        rows = read_test_rows(graph_dir).head(INPUT_EXAMPLE_ROWS)
        example = scoring.raw_rows(rows.drop(columns=[scoring.LABEL]))
        signature = ModelSignature(
            inputs=Schema([ColSpec(DataType.string, c, required=c != scoring.LABEL) for c in scoring.COLUMNS]),
            outputs=Schema([ColSpec(DataType[kind], name) for name, kind in scoring.OUTPUT_TYPES.items()]),
            params=ParamSchema([ParamSpec("fanout", DataType.long, 0)]))
        with _failed_example() as failures:
            mlflow.pyfunc.log_model(
                name=PYFUNC_ARTIFACT_PATH,
                python_model=TransactionScorer(),
                artifacts={"model_version": str(version_dir), "scoring_context": str(context_dir)},
                code_paths=[str(Path(__file__).resolve().parent)],
                pip_requirements=model_requirements(),
                signature=signature,
                input_example=example,
            )
        if failures:
            raise RuntimeError(f"the logged model could not score its input example ({len(example)} test rows "
                               f"of {graph_dir}): {failures[0]}")


@contextmanager
def _failed_example():
    """The messages of MLflow's failed input-example checks while logging a model (a list)."""
    failures: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("Failed to validate serving input example"):
                failures.append(record.getMessage().split("\n")[-1] or record.getMessage())

    logger, handler = logging.getLogger("mlflow.models.model"), Catch(logging.WARNING)
    level = logger.level
    if logger.getEffectiveLevel() > logging.WARNING:  # quieted elsewhere: the warning must still come
        logger.setLevel(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield failures
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


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
    graph_dir: Path | str | None = None,
    source: str | None = None,
) -> str:
    """Log one training run (params, metrics, model package, config, plots, the training data
    as a dataset input, the travelling pyfunc); return its id.

    ``graph_dir``: the graph directory it was trained on (default: ``tags["graph_dir"]``).
    ``source``: the notebook that trained it, the run's ``mlflow.source.name`` (default: the
    project's ``notebooks/02_train.ipynb``).
    """
    from fraudlib.model_export import version_dir_of
    from fraudlib.settings import project_root

    graph_dir = graph_dir or (tags or {}).get("graph_dir")
    if not graph_dir:
        raise ValueError("log_training_run needs the graph directory the model was trained on "
                         "(graph_dir, or tags['graph_dir']): the logged model carries its scoring context")
    graph_dir = Path(graph_dir)
    experiment_id = ensure_experiment(experiment)
    model_dir = Path(model_dir)
    version_dir = version_dir_of(model_dir)
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as run:
        mlflow.set_tags({"stage": "train", **(tags or {}),
                         "mlflow.source.name": source or str(project_root() / TRAIN_NOTEBOOK),
                         "mlflow.source.type": "NOTEBOOK"})
        mlflow.log_params({**_flatten("gnn", gnn_params), **_flatten("xgb", xgb_params)})
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})
        mlflow.log_artifacts(str(model_dir), artifact_path=MODEL_DIR_ARTIFACT_PATH)
        with tempfile.TemporaryDirectory() as tmp:
            config_path = Path(tmp) / "train_config.json"
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
            mlflow.log_artifact(str(config_path))
        for name, path in (plots or {}).items():
            mlflow.log_artifact(str(path), artifact_path="plots")
        with _quiet_mlflow():
            _log_training_data(graph_dir)
            _log_model(version_dir, graph_dir)
        log.info("MLflow run %s logged the model with its scoring context from %s", run.info.run_id, graph_dir)
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
