"""Stage 2, train: the graph -> a self-contained Triton model package and an MLflow run.

GNN + XGBoost beside a row-only baseline (and the features-only control when the graph has
causal features), each with its operating threshold chosen on the validation edges. The GNN
and XGBoost rules are :class:`fraudlib.training.GNNSettings` / ``XGBSettings`` (checked again
there); torch is imported only when the stage runs.

``engine`` says where XGBoost is fitted: in this process, or through ``xgboost.dask`` on a
Dask cluster (same parameters, same model package). In a pipeline the runner passes it the
preprocess stage's output ``engine`` (its ``auto`` resolved); run alone, ``auto`` applies the
preprocess stage's size rule to the input rows the graph's manifest records. The summary says
how large the graph was and the peak memory of this process (and of the Dask workers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fraudlib import settings
from fraudlib.stages import base
from fraudlib.stages.base import param

GNN_FIELDS = ("hidden_channels", "n_hops", "layer", "dropout_prob", "batch_size", "fan_out", "num_epochs",
              "node_edge_means")
XGB_FIELDS = ("max_depth", "learning_rate", "num_parallel_tree", "num_boost_round", "gamma")
LAYERS = ("SAGEConv", "GraphConv", "GATConv", "GATv2Conv")  # fraudlib.gnn.LAYERS (a test keeps them equal)
PLOTS = ("training_curve", "pr_curve", "confusion", "importance")
ENGINES = ("pandas", "dask", "auto")  # fraudlib.training.ENGINES (a test keeps them equal)


@dataclass(frozen=True)
class Params(base.StageParams):
    graph_dir: str = param("", "graph directory from stage 1; empty: the graph of the embedded default data (built on first use)")
    run_dir: str = param("", "run folder (set by run_pipeline.py); empty: runs/scratch")
    model_dir: str = param("", "model package written (a folder named prediction_and_shapley); empty: <run_dir>/model/prediction_and_shapley",
                           lambda v: not v or Path(v).name == settings.TRITON_MODEL_NAME,
                           f"empty or a path ending in {settings.TRITON_MODEL_NAME}")
    backend: str = param("native", "native (in-process PyG + XGBoost) or ngc (NVIDIA training container, GPU host + Docker)",
                         choices=("native", "ngc"))
    device: str = param("auto", "auto (CUDA when present), cpu or cuda", lambda v: v in ("auto", "cpu") or v.startswith("cuda"),
                        "auto, cpu or cuda[:N]")
    hidden_channels: int = param(32, "GNN hidden size (embedding dimensions per node)", lambda v: v >= 1, ">= 1")
    n_hops: int = param(2, "GNN layers: hops of neighbourhood each embedding sees", lambda v: v >= 1, ">= 1")
    layer: str = param("SAGEConv", "GNN layer type", choices=LAYERS)
    dropout_prob: float = param(0.1, "GNN dropout", lambda v: 0.0 <= v < 1.0, "in [0, 1)")
    batch_size: int = param(4096, "edges per mini-batch (only with neighbor sampling: pyg-lib or torch-sparse)",
                            lambda v: v >= 1, ">= 1")
    fan_out: int = param(10, "neighbors sampled per hop (only with neighbor sampling)", lambda v: v >= 1, ">= 1")
    num_epochs: int = param(8, "GNN training epochs", lambda v: v >= 1, ">= 1")
    node_edge_means: int = param(1, "1: node inputs also hold the mean of their edges' causal features; 0: id codes only",
                                 lambda v: v in (0, 1), "0 (id codes only) or 1 (with edge means)")
    max_depth: int = param(6, "XGBoost tree depth", lambda v: 1 <= v <= 32, "in [1, 32]")
    learning_rate: float = param(0.2, "XGBoost learning rate", lambda v: 0.0 < v <= 1.0, "in (0, 1]")
    num_parallel_tree: int = param(3, "XGBoost trees per boosting round", lambda v: v >= 1, ">= 1")
    num_boost_round: int = param(512, "XGBoost rounds (early stopping on the validation edges)", lambda v: v >= 1, ">= 1")
    gamma: float = param(0.0, "XGBoost minimum split loss", lambda v: v >= 0.0, ">= 0")
    alert_rate: float = param(0.0, "operating threshold: 0 means F1-max on validation, else the threshold that flags this fraction of validation edges",
                              lambda v: 0.0 <= v < 1.0, "in [0, 1)")
    train_seed: int = param(42, "seed of the GNN and XGBoost training (repeatable on CPU)")
    experiment_name: str = param(settings.EXPERIMENT_NAME, "MLflow experiment", lambda v: bool(v.strip()), "not empty")
    engine: str = param("auto", "where XGBoost is fitted: pandas (this process), dask (xgboost.dask on a Dask cluster, same model), auto: the preprocess stage's engine (its output, in a pipeline), else dask above 50,000,000 input rows (the graph's manifest)",
                        choices=ENGINES)
    scheduler_address: str = param("", "dask engine: an existing cluster's scheduler (tcp://host:8786); empty: $DASK_SCHEDULER_ADDRESS, else a local cluster sized to this machine")


@dataclass(frozen=True)
class Outputs:
    model_dir: Path
    mlflow_run_id: str
    graph_dir: Path
    manifest_hash: str | None
    test_auprc: float | None = None  # GNN + XGBoost on the test edges (native backend)
    baseline_test_auprc: float | None = None  # the row-only baseline on the same edges
    validation_threshold: float | None = None  # GNN + XGBoost's operating threshold
    # Not glued (in the summary instead): a later stage declaring `engine` must get preprocess's.
    engine: str = field(default="pandas", metadata={"glue": False})  # where XGBoost was fitted ("auto" resolved)
    dask_dashboard: str = field(default="", metadata={"glue": False})  # the Dask dashboard's link (dask engine)
    graph_size: dict = field(default_factory=dict, metadata={"glue": False})  # nodes, edges per split, feature dims
    peak_memory: dict = field(default_factory=dict, metadata={"glue": False})  # peak RSS bytes: process (and the Dask workers, summed)
    metrics: dict = field(default_factory=dict, metadata={"glue": False})  # model -> split -> metrics
    seconds: dict = field(default_factory=dict, metadata={"glue": False})  # per training phase
    plots: dict = field(default_factory=dict, metadata={"glue": False})  # name -> PNG path
    summary: str = field(default="", repr=False, metadata={"glue": False})


def run(params: Params) -> Outputs:
    from fraudlib import dask_engine, graph_store, plots, tracking, training
    from fraudlib.stages import preprocess

    run_dir = base.run_folder(params.run_dir)
    address = dask_engine.address_of(params.scheduler_address)
    if params.engine != "pandas" and params.backend == "native" and address:
        dask_engine.connect(address).close()  # reachable, before any work
    if params.graph_dir:
        graph_dir, source = Path(params.graph_dir).expanduser().resolve(), None
    else:
        graph_dir = preprocess.default_graph_dir()
        source = f"no graph_dir given: the graph of the embedded default data, {graph_dir}"
        print(source)
    model_dir = Path(params.model_dir).expanduser().resolve() if params.model_dir \
        else run_dir / "model" / settings.TRITON_MODEL_NAME
    gnn_params = {name: getattr(params, name) for name in GNN_FIELDS}
    xgb_params = {name: getattr(params, name) for name in XGB_FIELDS}
    result = None
    if params.backend == "native":
        result = training.train(graph_dir, model_dir.parent, gnn_params, xgb_params, device=params.device,
                                seed=params.train_seed, progress=False, alert_rate=params.alert_rate or None,
                                engine=params.engine, scheduler_address=params.scheduler_address)
        model_dir = result.model_dir
    else:
        from fraudlib import ngc  # needs a GPU host with Docker and the NGC image

        model_dir = ngc.train_with_container(graph_dir, model_dir.parent, gnn_params, xgb_params).model_dir
    figures = {}
    if result is not None:
        threshold = result.metrics["gnn_xgboost"]["validation"]["threshold"]
        figures = {"training_curve": plots.training_curve(result.curve),
                   "pr_curve": plots.pr_curves(result.test_labels, result.test_scores),
                   "confusion": plots.confusion(result.test_labels, result.test_scores, threshold),
                   "importance": plots.importance(result.feature_importance["gnn_xgboost"])}
    plot_paths = {name: plots.save(fig, run_dir / "plots" / f"train_{name}.png") for name, fig in figures.items()}
    plots.close(*figures.values())
    flat = {} if result is None else {
        **{f"{m}.{split}.{k}": v for m, by_split in result.metrics.items() for split, values in by_split.items()
           for k, v in values.items()},
        **{f"seconds.{k}": v for k, v in result.seconds.items()}}
    mlflow_run_id = tracking.log_training_run(
        experiment=params.experiment_name, run_name=run_dir.name, gnn_params=gnn_params, xgb_params=xgb_params,
        metrics=flat, model_dir=model_dir, plots=plot_paths,
        config={"graph_dir": str(graph_dir), "backend": params.backend, "train_seed": params.train_seed,
                "device": result.device if result else params.device, "gnn": gnn_params, "xgb": xgb_params},
        tags={"graph_dir": str(graph_dir), "run_dir": str(run_dir), "model_dir": str(Path(model_dir).resolve())})
    data_hash = graph_store.manifest_hash(graph_dir)
    details = [("graph", source or f"`{graph_dir}`"), ("model package", f"`{model_dir}`"),
               ("MLflow run", f"`{mlflow_run_id}` ({settings.mlflow_tracking_uri()})")]
    if result is not None:
        details += [("graph size", size_text(result.graph_size)),
                    ("XGBoost engine", result.engine + (f" on {result.cluster}" if result.cluster else "")
                     + (f" (Dask dashboard: {result.dashboard})" if result.dashboard else "")),
                    ("peak memory", memory_text(result.peak_memory))]
    if result is None:
        return Outputs(model_dir, mlflow_run_id, graph_dir, data_hash, plots=plot_paths,
                       summary=base.summary("02 train", run_dir, data_hash, "succeeded (NGC container)", details))
    test = {m: by_split["test"]["auprc"] for m, by_split in result.metrics.items()}
    outcome = ("succeeded: test AUPRC " + ", ".join(f"{m} {v:.4f}" for m, v in test.items())
               + f"; operating threshold {threshold:.4f} ({'F1-max' if not params.alert_rate else 'alert rate'}"
               " on validation)")
    return Outputs(model_dir=model_dir, mlflow_run_id=mlflow_run_id, graph_dir=graph_dir, manifest_hash=data_hash,
                   test_auprc=test["gnn_xgboost"], baseline_test_auprc=test["baseline"],
                   validation_threshold=threshold, engine=result.engine, dask_dashboard=result.dashboard,
                   graph_size=result.graph_size, peak_memory=result.peak_memory,
                   metrics=result.metrics, seconds=result.seconds,
                   plots=plot_paths, summary=base.summary("02 train", run_dir, data_hash, outcome, details))


def metrics_table(outputs: Outputs):
    """Every model's metrics per split, one row per (model, split)."""
    import pandas as pd

    rows = [{"model": m, "split": split, **values} for m, by_split in outputs.metrics.items()
            for split, values in by_split.items()]
    return pd.DataFrame(rows).set_index(["model", "split"]).round(4) if rows else pd.DataFrame()


def seconds_table(outputs: Outputs):
    import pandas as pd

    return pd.DataFrame({"seconds": outputs.seconds}).T.round(2)


def size_text(size: dict) -> str:
    """The graph's size in words: nodes, edges per split, feature dims."""
    nodes, edges, dims = size["nodes"], size["edges"], size["feature_dims"]
    return (f"{nodes['user']:,} users, {nodes['merchant']:,} merchants; edges: "
            + ", ".join(f"{split} {n:,}" for split, n in edges.items())
            + f"; feature dims: user {dims['user']}, merchant {dims['merchant']}, edge {dims['edge']}")


def memory_text(peaks: dict) -> str:
    """Peak RSS in GB: this process (the kernel, which trains the GNN), and the Dask workers."""
    text = f"{peaks['process'] / 1e9:.2f} GB this process (RSS, GNN full-batch here)"
    if "workers" in peaks:
        text += f", {peaks['workers'] / 1e9:.2f} GB the Dask workers (summed RSS, XGBoost)"
    return text


def size_table(outputs: Outputs):
    """The graph's size and the training's peak memory, one row per quantity."""
    import pandas as pd

    if not outputs.graph_size:
        return pd.DataFrame()
    size = outputs.graph_size
    rows = [*({"quantity": f"{k} nodes", "value": f"{v:,}"} for k, v in size["nodes"].items()),
            *({"quantity": f"{k} edges", "value": f"{v:,}"} for k, v in size["edges"].items()),
            *({"quantity": f"{k} feature dims", "value": str(v)} for k, v in size["feature_dims"].items()),
            *({"quantity": f"peak RSS, {k}", "value": f"{v / 1e9:.2f} GB"} for k, v in outputs.peak_memory.items())]
    return pd.DataFrame(rows).set_index("quantity")
