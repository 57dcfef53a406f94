"""Stage 3, evaluate: stage the challenger beside the champion in Triton, score both on the same
test transactions with explicit versions, and decide by a paired bootstrap
(:mod:`fraudlib.promotion`)."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field

from fraudlib.stages import base
from fraudlib.stages.base import param

METRICS = ("auprc", "roc_auc", "precision", "recall", "f1")  # fraudlib.promotion.METRICS (a test keeps them equal)


@dataclass(frozen=True)
class Params(base.StageParams):
    model_dir: str = param("", "model package from stage 2 (.../prediction_and_shapley); empty: the package the MLflow run mlflow_run_id logged")
    mlflow_run_id: str = param("", "MLflow training run of the model; empty: the run that logged model_dir")
    graph_dir: str = param("", "graph directory whose test edges are scored; empty: the training run's graph")
    triton_url: str = param("", "Triton server host:port; empty: $TRITON_URL, else an embedded server started here")
    run_dir: str = param("", "run folder (set by run_pipeline.py); empty: runs/scratch")
    promotion_metric: str = param("auprc", "compared metric: auprc (threshold-free) or roc_auc; f1, precision or recall at each model's own threshold",
                                  choices=METRICS)
    min_improvement: float = param(0.0, "promote only when the lower bound of the (challenger - champion) interval is above this")
    bootstrap_samples: int = param(1000, "paired bootstrap resamples of the test transactions", lambda v: v >= 1, ">= 1")
    confidence_level: float = param(0.95, "level of the bootstrap intervals (0.95: from the 2.5th to the 97.5th percentile)",
                                    lambda v: 0.0 < v < 1.0, "strictly between 0 and 1")
    bootstrap_seed: int = param(0, "seed of the resamples: the same inputs give the same decision", lambda v: v >= 0, ">= 0")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.model_dir or self.mlflow_run_id):
            raise base.StageParameterError(
                "evaluate: give model_dir (the package stage 2 wrote) or mlflow_run_id (its training run): "
                "no model is guessed")


@dataclass(frozen=True)
class Outputs:
    decision: str
    promotion_reason: str
    challenger_version: int
    champion_version: int  # 0: no champion before this run
    registry_version: int
    challenger_metric: float | None
    challenger_threshold: float
    metric_delta_ci: list | None  # [delta, low, high] of the promotion metric, with a champion
    comparison: dict = field(default_factory=dict, metadata={"glue": False})  # the table: model -> metric -> value
    notes: list = field(default_factory=list, metadata={"glue": False})  # how the models were compared
    plots: dict = field(default_factory=dict, metadata={"glue": False})
    summary: str = field(default="", repr=False, metadata={"glue": False})


def run(params: Params) -> Outputs:
    from fraudlib import graph_store, lifecycle, plots, scoring, tracking
    from fraudlib.triton_server import connect_or_start

    run_dir = base.run_folder(params.run_dir)
    model_dir = params.model_dir or tracking.configure().get_run(params.mlflow_run_id).data.tags["model_dir"]
    mlflow_run_id = params.mlflow_run_id or lifecycle.find_training_run(model_dir)
    graph_dir = params.graph_dir or tracking.configure().get_run(mlflow_run_id).data.tags["graph_dir"]
    with contextlib.ExitStack() as services:  # the given server, else $TRITON_URL, else our own
        client = services.enter_context(connect_or_start(params.triton_url or os.environ.get("TRITON_URL"),
                                                         run_dir / "triton.log"))
        ev = lifecycle.evaluate(model_dir, graph_dir, client, mlflow_run_id, metric=params.promotion_metric,
                                min_improvement=params.min_improvement, bootstrap_samples=params.bootstrap_samples,
                                confidence_level=params.confidence_level, bootstrap_seed=params.bootstrap_seed)
        if ev.comparison is None:  # the challenger's scores of every test edge: kept for stage 4's example
            version_dir = lifecycle.repository(client).version_dir(ev.challenger_version)
            scoring.keep_test_scores(run_dir, json.loads((version_dir / "meta.json").read_text()), graph_dir,
                                     ev.challenger_scores)
    d = ev.decision
    scores = {f"challenger v{ev.challenger_version}": ev.challenger_scores}
    if ev.champion_scores is not None:
        scores[f"champion v{ev.champion_version}"] = ev.champion_scores
    figures = {"pr_curves": plots.pr_curves(ev.labels, scores, "Precision-recall through Triton, test edges")}
    for (name, s), threshold in zip(scores.items(), ev.thresholds.values()):  # each at its own threshold
        figures[f"confusion_{name.split()[0]}"] = plots.confusion(ev.labels, {name: s}, threshold)
    if d.delta is not None:
        figures["delta_interval"] = plots.delta_interval(d.delta, d.delta_low, d.delta_high, d.metric,
                                                         d.min_improvement, d.level)
    plot_paths = {}
    for name, fig in figures.items():
        plot_paths[name] = plots.save(fig, run_dir / "plots" / f"evaluate_{name}.png")
        tracking.log_artifact(mlflow_run_id, plot_paths[name], "evaluation")
    plots.close(*figures.values())
    champion = f"Triton version {ev.champion_version}" if ev.champion_version else "none (first model)"
    details = [("decision", f"**{d.decision.upper()}**"), ("reason", d.reason),
               ("challenger", f"Triton version {ev.challenger_version} (registry version {ev.registry_version})"),
               ("champion", champion), ("test graph", f"`{graph_dir}`")]
    if d.delta is not None:
        details.append((f"{d.metric} challenger - champion",
                        f"{d.delta:+.4f}, {d.level * 100:g}% interval [{d.delta_low:+.4f}, {d.delta_high:+.4f}]"))
    text = base.summary("03 evaluate", run_dir, graph_store.manifest_hash(graph_dir),
                        f"succeeded: decision {d.decision}", details)
    notes = [n for n in (ev.comparison, ev.champion_unusable, *ev.threshold_notes, *ev.repairs) if n]
    return Outputs(decision=d.decision, promotion_reason=d.reason, challenger_version=ev.challenger_version,
                   champion_version=ev.champion_version or 0, registry_version=ev.registry_version,
                   challenger_metric=d.challenger_value, challenger_threshold=ev.thresholds["challenger"],
                   metric_delta_ci=None if d.delta is None else [d.delta, d.delta_low, d.delta_high],
                   comparison=ev.summary(), notes=notes, plots=plot_paths, summary=text)


def comparison_table(outputs: Outputs):
    import pandas as pd

    return pd.DataFrame(outputs.comparison).round(4)
