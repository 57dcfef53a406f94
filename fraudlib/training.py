"""Train the GNN + XGBoost fraud model, and the tabular baseline beside it, on a graph directory.

Phases (each timed in ``TrainResult.seconds``):

1. load: the train part (train + validation edges) and the test part of the graph directory.
2. gnn: ``FraudGNN`` trained with class-weighted cross-entropy on the train edges, one graph
   per year (``period_masks``: a scored graph covers a short period, so training sees
   neighbourhoods as sparse as serving does). Messages pass over each graph's *context*
   (``context_mask``): its non-fraud edges and its fraud edges at the non-fraud edges' sampling
   rate, a uniform sample of the stream whose shape does not depend on the labels (the
   undersampled graph holds every fraud row, and a GNN passing messages over it learned to read
   fraud off a node's neighbourhood, which served graphs never show: docs/model_quality.md).
   Every edge is classified from its nodes' embeddings. Full-batch (one step per year per epoch) unless
   pyg-lib or torch-sparse is importable; then neighbour-sampled mini-batches (``batch_size`` edges, ``fan_out``
   neighbours per hop) over the whole train graph, a path that cannot run (and is untested) where neither is installed.
3. embed: train edges over their year's context, validation edges over the validation
   context (early stopping and the threshold see label-independent neighbourhoods, as serving
   does), test edges over the whole test graph, exactly as the evaluate stage sends it to
   Triton (the test scores are the served model's).
4. xgboost: XGBoost (hist) on [user x | user h | merchant x | merchant h | edge x], early stopping
   on the validation edges; the model keeps the best iteration only. One tree is grown per
   round: without row or column sampling the ``num_parallel_tree`` trees of a round would be
   identical, and XGBoost averages them.
5. baseline (run beside phases 2-4, in a thread): the same XGBoost on the row alone: [user x | merchant x | edge x] without the
   causal graph/time features (the row-only control); and, when the graph has causal
   features, ``graph_features``: XGBoost on the row plus those features, without embeddings.
   Together they show what the features and what the GNN add (benchmarks/bench_quality.py).
6. export: the self-contained Triton model package (``fraudlib.model_export``).

``engine="dask"`` fits the XGBoost models (phases 4 and 5) through ``xgboost.dask`` on a Dask
cluster (``dask_engine.cluster``: a LocalCluster sized to this machine, or the one at
``scheduler_address`` / ``$DASK_SCHEDULER_ADDRESS``, reached before any data is read): the
same parameters and early stopping, the rows spread over the workers, one booster of the same
format, so the model package and serving do not change. Only the matrices differ; everything
else is shared. The GNN stays full-batch in this process. ``TrainResult`` says how large the
graph was and the peak memory (RSS) of this process and, with dask, of the workers.

Hyperparameters use the NVIDIA training container's names and defaults (``GNNSettings``,
``XGBSettings``); invalid ones fail before any data is read.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
import xgboost as xgb

from fraudlib import dask_engine, features, gnn, metrics, model_export
from fraudlib.graph_store import MANIFEST, Graph, compact, manifest_hash, read_manifest, read_part

# Not container hyperparameters: fixed here so that a run is described by the container's names.
GNN_LEARNING_RATE = 0.01
EARLY_STOPPING_ROUNDS = 32
# Rounds that raise the validation AUPRC by less than this (within EARLY_STOPPING_ROUNDS) do
# not count as progress: on the full-size graph the model with edge means kept 502 rounds for
# gains in the fourth decimal, 3x the training time (docs/benchmarks.md).
EARLY_STOPPING_MIN_DELTA = 1e-3
ENGINES = dask_engine.ENGINES  # pandas: XGBoost in this process; dask: xgboost.dask; auto: by input rows
MEMORY_SAMPLE_S = 0.2  # this process's RSS; the workers' every MEMORY_SAMPLE_S * 5 (a scheduler call)
# Test edges whose XGBoost input is built and scored at once: the whole test period's input
# (1.5M edges x 153 columns at full size, 0.93 GB, and its gathered pieces as much again) set
# training's peak memory, which then grew with the test period (docs/scaling.md).
TEST_BATCH_EDGES = 1 << 18


class HyperparameterError(ValueError):
    """A hyperparameter is unknown, of the wrong type or out of range."""


def _rule(default, check, text: str, container: bool = True):
    """A setting's default, value rule and its text; ``container=False``: not a training
    container hyperparameter (fraudlib's own; the container's config leaves it out)."""
    return field(default=default, metadata={"check": check, "text": text, "container": container})


def container_settings(settings) -> dict:
    """The training container's hyperparameters of ``settings`` (GNNSettings or XGBSettings)."""
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings) if f.metadata["container"]}


@dataclass(frozen=True)
class GNNSettings:
    """GNN hyperparameters (training container names and defaults)."""

    hidden_channels: int = _rule(32, lambda v: v >= 1, ">= 1")
    n_hops: int = _rule(2, lambda v: v >= 1, ">= 1")
    layer: str = _rule("SAGEConv", lambda v: v in gnn.LAYERS, f"one of {sorted(gnn.LAYERS)}")
    dropout_prob: float = _rule(0.1, lambda v: 0.0 <= v < 1.0, "in [0, 1)")
    batch_size: int = _rule(4096, lambda v: v >= 1, ">= 1")
    fan_out: int = _rule(10, lambda v: v >= 1, ">= 1")
    num_epochs: int = _rule(8, lambda v: v >= 1, ">= 1")
    # Not a container name: node inputs with the mean of their edges' causal features (gnn.py).
    node_edge_means: int = _rule(1, lambda v: v in (0, 1), "0 (id codes only) or 1 (with edge means)",
                                 container=False)


@dataclass(frozen=True)
class XGBSettings:
    """XGBoost hyperparameters (training container names and defaults)."""

    max_depth: int = _rule(6, lambda v: 1 <= v <= 32, "in [1, 32]")
    learning_rate: float = _rule(0.2, lambda v: 0.0 < v <= 1.0, "in (0, 1]")
    num_parallel_tree: int = _rule(3, lambda v: v >= 1, ">= 1")
    num_boost_round: int = _rule(512, lambda v: v >= 1, ">= 1")
    gamma: float = _rule(0.0, lambda v: v >= 0.0, ">= 0")


def parse_settings(cls, params: dict | None, group: str):
    """``cls`` (GNNSettings or XGBSettings) from a plain dict; raises HyperparameterError naming the key."""
    if params is None:
        return cls()
    if not isinstance(params, dict):
        raise HyperparameterError(f"{group} must be a dict of hyperparameters, got {type(params).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise HyperparameterError(f"{group}: unknown hyperparameter(s) {unknown}; known: {sorted(fields)}")
    values = {}
    for name, value in params.items():
        kind = {"int": int, "float": float, "str": str}[fields[name].type]
        values[name] = _coerce(value, kind, f"{group}[{name!r}]")
        if not fields[name].metadata["check"](values[name]):
            raise HyperparameterError(
                f"{group}[{name!r}] = {value!r} is out of range: it must be {fields[name].metadata['text']}")
    return cls(**values)


_EXPECTED = {int: "an integer", float: "a finite number", str: "a string"}


def _coerce(value: Any, kind: type, where: str):
    if isinstance(value, (bool, np.bool_)):
        ok = False  # bool is an int subclass, but True is no layer count
    elif kind is int:
        ok = isinstance(value, (int, np.integer))
    elif kind is float:
        ok = isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise HyperparameterError(f"{where} = {value!r} has the wrong type: it must be {_EXPECTED[kind]}")
    return kind(value)


@dataclass
class TrainResult:
    model_dir: Path  # <out_dir>/prediction_and_shapley
    metrics: dict  # {"gnn_xgboost" | "baseline" [| "graph_features"]: {"validation" | "test": metrics.report(...)}}
    seconds: dict  # per phase: load, gnn, embed, xgboost, baseline, export
    curve: dict  # {"epoch": [...], "loss": [...], "val_auprc": [...]} of the GNN's own head
    test_labels: np.ndarray
    test_scores: dict  # model -> [E] fraud probabilities on the test edges (keys as ``metrics``)
    feature_importance: dict  # model -> {feature name: total gain}, largest first
    gnn_settings: GNNSettings
    xgb_settings: XGBSettings
    xgboost_rounds: dict  # model -> boosting rounds kept by early stopping
    device: str
    # model -> booster (the controls are not exported; benchmarks score them on other edges)
    boosters: dict = field(default_factory=dict, repr=False)
    engine: str = "pandas"  # where XGBoost was fitted ("auto" resolved)
    cluster: str = ""  # the Dask cluster, in words (dask engine)
    dashboard: str = ""  # its dashboard's link (dask engine)
    graph_size: dict = field(default_factory=dict)  # nodes, edges per split, feature dims (graph_size())
    peak_memory: dict = field(default_factory=dict)  # bytes: "process" and, with dask, "workers" (summed)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. under taskset or a container)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" or device.startswith("cuda"):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but torch sees no CUDA device: use 'auto' or 'cpu'")
        return device
    raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")


def neighbor_sampling_available() -> bool:
    import torch_geometric.typing as pyg_typing

    return bool(pyg_typing.WITH_PYG_LIB or pyg_typing.WITH_TORCH_SPARSE)


def _check_graph(graph_dir: Path, train_part: Graph, test_part: Graph) -> None:
    where = f"graph directory {graph_dir}"
    for part, g in (("train", train_part), ("test", test_part)):
        if g.num_edges == 0:
            raise ValueError(f"{where}: the {part} part has no edges")
        if g.edge_index.min() < 0 or g.edge_index[0].max() >= len(g.x_user) \
                or g.edge_index[1].max() >= len(g.x_merchant):
            raise ValueError(f"{where}: {part} edges point outside the node tables")
    dims = lambda g: (g.x_user.shape[1], g.x_merchant.shape[1], g.edge_attr.shape[1])  # noqa: E731
    if dims(train_part) != dims(test_part):
        raise ValueError(f"{where}: train and test feature dims differ: {dims(train_part)} vs {dims(test_part)}")
    splits = set(np.unique(train_part.split))
    if not {"train", "validation"} <= splits:
        raise ValueError(f"{where}: the train part needs both 'train' and 'validation' edges "
                         f"(gnn/edges/user_to_merchant_split.csv has {sorted(splits)}); "
                         "validation edges drive early stopping and the decision threshold")
    for split in ("train", "validation"):
        if np.unique(train_part.label[train_part.split == split]).size < 2:
            raise ValueError(f"{where}: the {split} edges hold one class only; fraud and non-fraud are "
                             "both needed (early stopping and the threshold are chosen on validation)")


def _tensors(graph: Graph, device: str) -> tuple[torch.Tensor, ...]:
    return (torch.as_tensor(graph.x_user, device=device), torch.as_tensor(graph.x_merchant, device=device),
            torch.as_tensor(graph.edge_index, device=device), torch.as_tensor(graph.edge_attr, device=device))


@contextmanager
def repeatable(device: str):
    """On CPU, torch single-threaded: its multi-threaded scatter sums (message passing) add in
    a varying order, so two runs with one seed gave GNN weights 0.06 apart and different models."""
    if device != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def period_masks(graph: Graph) -> list[np.ndarray]:
    """Edge masks of the graph's periods (years); one mask of all edges when it has no years.

    A graph sent for scoring covers a short period (the test graph: 2019-2020), so its nodes
    have few edges. Training on the 27 train years as one graph would teach the GNN on far
    denser neighbourhoods than it is served; a graph per year keeps training and serving alike
    (and gives the full-batch path one optimizer step per year instead of one per epoch).
    """
    if graph.year is None:
        return [np.ones(graph.num_edges, dtype=bool)]
    return [graph.year == y for y in np.unique(graph.year)]


def context_rate(graph_dir: Path | str) -> float:
    """The share of the stream's non-fraud rows that the graph holds (undersampling kept them
    uniformly), from the manifest; 1.0 when the graph was not undersampled or has no manifest."""
    rows = read_manifest(graph_dir).get("rows", {}) if (Path(graph_dir) / MANIFEST).is_file() else {}
    kept, total = rows.get("non_fraud_kept"), rows.get("non_fraud_unique")
    return min(1.0, kept / total) if kept and total else 1.0


def context_mask(graph: Graph, rate: float, seed: int) -> np.ndarray:
    """The edges messages pass over: a sample of the stream whose membership does not depend on
    the labels. The graph holds every fraud row but only ``rate`` of the rest, so its shape
    tells fraud apart (a burst leaves a card with many edges); message passing over it let the
    GNN read labels that no served graph (every transaction, unlabelled) shows. Every non-fraud
    edge is a uniform sample of the stream's non-fraud rows, and each fraud edge is kept with the
    same probability: together a uniform sample of all rows, and a mean over a node's
    neighbours in it estimates the mean over the whole stream that serving sees."""
    keep = graph.label == 0
    fraud = np.flatnonzero(~keep)
    rng = np.random.default_rng([seed, 7])
    keep[fraud] = rng.random(fraud.size) < rate
    # A node left without a context edge (one seen in fraud rows only) would be embedded from
    # its own features alone, a state served graphs never show (a scored row is in the graph
    # it is sent): such a node keeps one of its edges, drawn at random.
    for side, size in ((0, graph.x_user.shape[0]), (1, graph.x_merchant.shape[0])):
        node = graph.edge_index[side]
        lonely = np.bincount(node, minlength=size) > 0
        lonely &= np.bincount(node[keep], minlength=size) == 0
        candidates = np.flatnonzero(lonely[node])
        if candidates.size:
            shuffled = candidates[rng.permutation(candidates.size)]
            _, first = np.unique(node[shuffled], return_index=True)
            keep[shuffled[first]] = True
    return keep


def _with_context(graph: Graph, rate: float, seed: int, device: str) -> tuple[torch.Tensor, ...]:
    """(x_user, x_merchant, context edge index, context edge attr, edge index, edge attr)
    tensors of ``graph`` with its node ids compacted."""
    g = compact(graph)
    keep = torch.as_tensor(context_mask(g, rate, seed), device=device)
    xu, xm, ei, ea = _tensors(g, device)
    return xu, xm, ei[:, keep], ea[keep], ei, ea


def _logits(model: gnn.FraudGNN, xu, xm, context, context_attr, ei, ea) -> torch.Tensor:
    h_user, h_merchant = model.embed(xu, xm, context, edge_attr=context_attr)
    return model.classify(h_user, h_merchant, ei, ea)


@torch.no_grad()
def embed_over_context(model: gnn.FraudGNN, graph: Graph, rate: float, seed: int, device: str) -> np.ndarray:
    """XGBoost input of every edge of ``graph``, its nodes embedded over its context edges."""
    xu, xm, context, context_attr, ei, ea = _with_context(graph, rate, seed, device)
    h_user, h_merchant = model.embed(xu, xm, context, edge_attr=context_attr)
    return gnn._edge_features(xu, h_user, xm, h_merchant, ei, ea).cpu().numpy()


def embed_edges(model: gnn.FraudGNN, graph: Graph, rate: float, seed: int, device: str) -> np.ndarray:
    """XGBoost input of every edge, each period's edges embedded over that period's context."""
    out = None
    for mask in period_masks(graph):
        features = embed_over_context(model, graph.edges(mask), rate, seed, device)
        if out is None:
            out = np.empty((graph.num_edges, features.shape[1]), dtype=np.float32)
        out[mask] = features
    return out


def _edge_means(graph: Graph, s: GNNSettings) -> int:
    """How many trailing edge columns the GNN averages into node inputs: the causal features
    (preprocessing appends them last), when the graph has them and ``node_edge_means`` is on."""
    causal = len(features.NAMES)
    tail = list(graph.edge_features[-causal:])
    return causal if s.node_edge_means and tail == list(features.NAMES) else 0


def _class_weights(labels: torch.Tensor) -> torch.Tensor:
    counts = torch.bincount(labels, minlength=2).clamp(min=1).float()
    return counts.sum() / (2 * counts)


def _train_gnn(model: gnn.FraudGNN, train: Graph, val: Graph, s: GNNSettings, device: str,
               progress: bool, rate: float, seed: int) -> dict:
    y = torch.as_tensor(train.label, device=device)
    val_tensors = _with_context(val, rate, seed, device)
    weight = _class_weights(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=GNN_LEARNING_RATE)
    sampled = neighbor_sampling_available()
    if sampled:
        loader = _link_loader(train, s)
        ea = torch.as_tensor(train.edge_attr, device=device)
    else:
        periods = [_with_context(train.edges(m), rate, seed, device) + (y[torch.as_tensor(m, device=device)],)
                   for m in period_masks(train)]
        order = np.random.default_rng(0)
    curve = {"epoch": [], "loss": [], "val_auprc": []}
    for epoch in range(1, s.num_epochs + 1):
        model.train()
        if sampled:
            loss = _sampled_epoch(model, loader, ea, y, weight, optimizer)
        else:
            losses = []
            for period in order.permutation(len(periods)):
                *tensors, py = periods[period]
                optimizer.zero_grad()
                loss_t = F.cross_entropy(_logits(model, *tensors), py, weight=weight)
                loss_t.backward()
                optimizer.step()
                losses.append(loss_t.item() * len(py))
            loss = sum(losses) / len(y)
        model.eval()
        with torch.no_grad():
            val_scores = torch.softmax(_logits(model, *val_tensors), dim=1)[:, 1].cpu().numpy()
        curve["epoch"].append(epoch)
        curve["loss"].append(loss)
        curve["val_auprc"].append(metrics.auprc(val.label, val_scores))
        if progress:
            print(f"  GNN epoch {epoch}/{s.num_epochs}: loss {loss:.4f}, "
                  f"validation AUPRC {curve['val_auprc'][-1]:.4f}", flush=True)
    return curve


def _link_loader(graph: Graph, s: GNNSettings):
    """Neighbour-sampled mini-batches of the train edges (needs pyg-lib or torch-sparse)."""
    from torch_geometric.data import HeteroData
    from torch_geometric.loader import LinkNeighborLoader

    xu, xm, ei, _ = _tensors(graph, "cpu")  # the samplers work on CPU tensors
    data = HeteroData()
    data["user"].x, data["merchant"].x = xu, xm
    data[gnn.USER_TO_MERCHANT].edge_index = ei
    data[gnn.MERCHANT_TO_USER].edge_index = ei.flip(0)
    # A seed edge's label is its position, to look up its class and edge features.
    return LinkNeighborLoader(data, num_neighbors=[s.fan_out] * s.n_hops,
                              edge_label_index=(gnn.USER_TO_MERCHANT, ei),
                              edge_label=torch.arange(ei.shape[1]), batch_size=s.batch_size, shuffle=True)


def _sampled_epoch(model, loader, ea, y, weight, optimizer) -> float:
    total, count = 0.0, 0
    for batch in loader:
        batch = batch.to(ea.device)
        edges = batch[gnn.USER_TO_MERCHANT]
        ids = edges.edge_label
        optimizer.zero_grad()
        h_user, h_merchant = model.embed(batch["user"].x, batch["merchant"].x, edges.edge_index,
                                         batch[gnn.MERCHANT_TO_USER].edge_index,
                                         edge_attr=ea[edges.e_id] if model.edge_means else None)
        logits = model.classify(h_user, h_merchant, edges.edge_label_index, ea[ids])
        loss = F.cross_entropy(logits, y[ids], weight=weight)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(ids)
        count += len(ids)
    return total / max(count, 1)


def choose_engine(engine: str, graph_dir: Path | str) -> str:
    """``engine``, with ``auto`` resolved by the preprocess stage's rule (dask above
    ``dask_engine.AUTO_DASK_ROWS`` input rows) on the rows the graph's manifest says were read."""
    path = Path(graph_dir) / MANIFEST
    rows = read_manifest(graph_dir).get("rows", {}).get("read", 0) if path.is_file() else 0
    return dask_engine.choose_engine(engine, rows)


def graph_size(train_part: Graph, test: Graph) -> dict:
    """How large the trained graph was: nodes, edges per split, feature dims."""
    return {"nodes": {"user": int(test.x_user.shape[0]), "merchant": int(test.x_merchant.shape[0])},
            "edges": {**{s: int((train_part.split == s).sum()) for s in ("train", "validation")},
                      "test": int(test.num_edges)},
            "feature_dims": {"user": int(test.x_user.shape[1]), "merchant": int(test.x_merchant.shape[1]),
                             "edge": int(test.edge_attr.shape[1])}}


@contextmanager
def peak_memory(cluster: "dask_engine.Cluster | None" = None):
    """A dict that holds, once the block ends, the peak RSS in bytes of this process
    (``process``) and, with a cluster, of the sum over its workers (``workers``: what their
    heartbeats report to the scheduler, so no code of ours runs there), sampled in a thread:
    every MEMORY_SAMPLE_S here, five times less often from the scheduler."""
    import psutil

    peaks = {"process": 0, **({"workers": 0} if cluster is not None else {})}
    me, done = psutil.Process(), threading.Event()

    def sample() -> None:
        tick = 0
        while True:
            peaks["process"] = max(peaks["process"], me.memory_info().rss)
            if cluster is not None and tick % 5 == 0:
                try:
                    workers = cluster.client.scheduler_info()["workers"].values()
                    peaks["workers"] = max(peaks["workers"], sum(w["metrics"]["memory"] for w in workers))
                except Exception:  # noqa: BLE001 - a worker gone between two samples: the next one counts
                    pass
            tick += 1
            if done.wait(MEMORY_SAMPLE_S):
                return

    thread = threading.Thread(target=sample, name="peak-memory", daemon=True)
    thread.start()
    try:
        yield peaks
    finally:
        done.set()
        thread.join()


def _xgb_params(s: XGBSettings, device: str, seed: int) -> dict:
    # XGBoost averages the num_parallel_tree trees of a round. Without row or column sampling
    # (the container exposes none) they are identical, so growing one gives the same model,
    # num_parallel_tree times faster (checked in tests/test_training.py).
    return {"objective": "binary:logistic", "eval_metric": "aucpr", "tree_method": "hist",
            "max_depth": s.max_depth, "learning_rate": s.learning_rate, "num_parallel_tree": 1,
            "gamma": s.gamma, "nthread": usable_cores(), "seed": seed, "device": device}


@dataclass(frozen=True)
class EdgeBatches:
    """The XGBoost input of ``edges`` edges, built per batch: ``rows(start, stop)``."""

    edges: int
    rows: Callable[[int, int], np.ndarray]

    def scores(self, booster: xgb.Booster) -> np.ndarray:
        """``booster``'s scores of every edge, TEST_BATCH_EDGES at a time (each edge's score is
        its own row's: the same values as one call on the whole input)."""
        out = np.empty(self.edges, dtype=np.float32)
        for start in range(0, self.edges, TEST_BATCH_EDGES):
            stop = min(self.edges, start + TEST_BATCH_EDGES)
            out[start:stop] = booster.inplace_predict(self.rows(start, stop))
        return out


def _fit_xgboost(x: dict, y: dict, s: XGBSettings, device: str, seed: int,
                 cluster: "dask_engine.Cluster | None" = None) -> tuple[xgb.Booster, dict]:
    """Booster cut at its best validation iteration, and its scores on validation and test
    (``x["test"]``: EdgeBatches, scored batch by batch); fitted here, or through
    ``xgboost.dask`` on ``cluster``'s workers."""
    params = _xgb_params(s, device, seed)
    stop = xgb.callback.EarlyStopping(rounds=EARLY_STOPPING_ROUNDS, min_delta=EARLY_STOPPING_MIN_DELTA,
                                      maximize=True)
    fit = dict(num_boost_round=s.num_boost_round, callbacks=[stop], verbose_eval=False)
    if cluster is None:
        # QuantileDMatrix holds only bin indices (less memory than a DMatrix copy of the features).
        train = xgb.QuantileDMatrix(x["train"], label=y["train"], nthread=params["nthread"])
        validation = xgb.QuantileDMatrix(x["validation"], label=y["validation"], ref=train,
                                         nthread=params["nthread"])
        booster = xgb.train(params, train, evals=[(validation, "validation")], **fit)
    else:
        from xgboost import dask as dxgb

        del params["nthread"]  # each worker uses its own threads
        client = cluster.client
        with client.as_current():  # xgboost.dask checks the client against the current one
            train = dxgb.DaskQuantileDMatrix(client, *_spread(client, x["train"], y["train"]))
            validation = dxgb.DaskQuantileDMatrix(client, *_spread(client, x["validation"], y["validation"]),
                                                  ref=train)
            booster = dxgb.train(client, params, train, evals=[(validation, "validation")], **fit)["booster"]
            del train, validation  # the workers let go of the rows
    booster = booster[: booster.best_iteration + 1]
    # Scored from the raw features, as the served model scores them; in place: no DMatrix copy.
    return booster, {"validation": booster.inplace_predict(x["validation"]), "test": x["test"].scores(booster)}


def _spread(client, x: np.ndarray, y: np.ndarray):
    """(features, labels) as dask arrays of one contiguous block of rows per worker, the
    blocks sent to the workers (scatter), not through the scheduler."""
    import dask.array as da

    bounds = np.linspace(0, len(y), max(1, min(len(y), len(client.nthreads()))) + 1).astype(np.int64)

    def spread(values: np.ndarray):
        blocks = [values[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        futures = client.scatter(blocks, hash=False)
        return da.concatenate([da.from_delayed(f, b.shape, dtype=b.dtype) for f, b in zip(futures, blocks)])

    return spread(x), spread(y)


def _importance(booster: xgb.Booster, names: list[str]) -> dict[str, float]:
    gain = booster.get_score(importance_type="total_gain")
    named = {names[int(k[1:])]: float(v) for k, v in gain.items()}  # keys are f0, f1, ...
    return dict(sorted(named.items(), key=lambda kv: -kv[1]))


def control_columns(edge_features: list[str]) -> dict[str, np.ndarray]:
    """The controls' edge columns: ``baseline`` the row's own (no causal features), and
    ``graph_features`` all of them when the graph has causal features."""
    row_only = ~np.isin(edge_features, features.NAMES)
    return {"baseline": row_only, **({} if row_only.all() else {"graph_features": np.ones_like(row_only)})}


def tabular(graph: Graph, columns: np.ndarray, edges: slice = slice(None)) -> np.ndarray:
    """A control's XGBoost input: each edge's (of ``edges``) [user x | merchant x | edge x of ``columns``]."""
    index = graph.edge_index[:, edges]
    return np.hstack([graph.x_user[index[0]], graph.x_merchant[index[1]], graph.edge_attr[edges][:, columns]])


def _fit_controls(graphs: dict, y: dict, s: XGBSettings, device: str, seed: int,
                  cluster: "dask_engine.Cluster | None" = None) -> tuple[dict, dict, float]:
    """The row-only baseline, and XGBoost on the row plus the causal features when the graph has
    them: (boosters, scores, seconds)."""
    started = time.perf_counter()
    boosters, scores = {}, {}
    for control, columns in control_columns(graphs["test"].edge_features).items():
        x_tab = {split: tabular(graphs[split], columns) for split in ("train", "validation")}
        x_tab["test"] = EdgeBatches(graphs["test"].num_edges,
                                    lambda a, b, c=columns: tabular(graphs["test"], c, slice(a, b)))
        boosters[control], scores[control] = _fit_xgboost(x_tab, y, s, device, seed, cluster)
        del x_tab
    return boosters, scores, time.perf_counter() - started


def _evaluate(y: dict, scores: dict, alert_rate: float | None) -> dict:
    threshold = metrics.choose_threshold(y["validation"], scores["validation"], alert_rate)
    return {split: metrics.report(y[split], scores[split], threshold) for split in ("validation", "test")}


def train(graph_dir: Path | str, out_dir: Path | str, gnn_params: dict | None = None,
          xgb_params: dict | None = None, device: str = "auto", seed: int = 42,
          progress: bool = True, alert_rate: float | None = None, engine: str = "pandas",
          scheduler_address: str = "") -> TrainResult:
    """Train on ``graph_dir`` and write the model package under ``out_dir``; see the module doc.

    Each model's operating threshold is chosen on the validation edges: F1-max, or the
    threshold that flags ``alert_rate`` of them (``metrics.choose_threshold``). ``engine``
    (``ENGINES``) says where XGBoost is fitted; with ``dask`` the cluster
    (``scheduler_address``, else ``$DASK_SCHEDULER_ADDRESS``, else a local one) is reached
    before any data is read, or ``dask_engine.ClusterError`` says why not."""
    if alert_rate is not None and not (isinstance(alert_rate, (int, float)) and 0 < alert_rate < 1):
        raise HyperparameterError(f"alert_rate = {alert_rate!r} must be a fraction in (0, 1), or None for F1-max")
    gnn_s = parse_settings(GNNSettings, gnn_params, "gnn_params")
    xgb_s = parse_settings(XGBSettings, xgb_params, "xgb_params")
    device = resolve_device(device)
    graph_dir, out_dir = Path(graph_dir), Path(out_dir)
    engine = choose_engine(engine, graph_dir)
    with ExitStack() as stack:
        cluster = stack.enter_context(dask_engine.cluster(scheduler_address)) if engine == "dask" else None
        with peak_memory(cluster) as peaks:
            result = _train(graph_dir, out_dir, gnn_s, xgb_s, device, seed, progress, alert_rate, cluster)
    result.engine, result.peak_memory = engine, peaks
    if cluster is not None:
        result.cluster, result.dashboard = cluster.description, cluster.dashboard
    return result


def _train(graph_dir: Path, out_dir: Path, gnn_s: GNNSettings, xgb_s: XGBSettings, device: str, seed: int,
           progress: bool, alert_rate: float | None, cluster: "dask_engine.Cluster | None") -> TrainResult:
    seconds: dict[str, float] = {}
    say = print if progress else (lambda *a, **k: None)

    t = time.perf_counter()
    train_part, test = read_part(graph_dir, "train"), read_part(graph_dir, "test")
    _check_graph(graph_dir, train_part, test)
    graphs = {"train": train_part.edges(train_part.split == "train"),
              "validation": train_part.edges(train_part.split == "validation"), "test": test}
    y = {split: g.label for split, g in graphs.items()}
    seconds["load"] = time.perf_counter() - t
    say(f"loaded {graph_dir}: " + ", ".join(f"{k} {g.num_edges} edges ({int(g.label.sum())} fraud)"
                                             for k, g in graphs.items()), flush=True)

    # The controls need no GNN: their XGBoost runs beside the GNN's single-threaded training
    # (XGBoost releases the GIL; on 2 cores ~8 s less at full size), or on the cluster's workers.
    # Deterministic either way.
    pool = ThreadPoolExecutor(1)
    controls_done = pool.submit(_fit_controls, graphs, y, xgb_s, device, seed, cluster)
    pool.shutdown(wait=False)

    t = time.perf_counter()
    torch.manual_seed(seed)
    architecture = {"user_channels": test.x_user.shape[1], "merchant_channels": test.x_merchant.shape[1],
                    "edge_channels": test.edge_attr.shape[1], "hidden_channels": gnn_s.hidden_channels,
                    "n_hops": gnn_s.n_hops, "layer": gnn_s.layer, "dropout_prob": gnn_s.dropout_prob,
                    "edge_means": _edge_means(test, gnn_s)}
    model = gnn.FraudGNN(**architecture).to(device)
    rate = context_rate(graph_dir)
    with repeatable(device):
        curve = _train_gnn(model, graphs["train"], graphs["validation"], gnn_s, device, progress, rate, seed)
    seconds["gnn"] = time.perf_counter() - t

    t = time.perf_counter()
    model.eval()
    # Train (per year) and validation (2018) edges embedded over their label-independent
    # context; the test edges (2019-2020) over the whole test graph, as Triton is sent it by
    # the evaluate stage (its scores are the served model's).
    with repeatable(device):
        x_emb = {"train": embed_edges(model, graphs["train"], rate, seed, device),
                 "validation": embed_over_context(model, graphs["validation"], rate, seed, device),
                 "test": _test_input(model, graphs["test"], device)}
    seconds["embed"] = time.perf_counter() - t

    names = _feature_names(test, gnn_s.hidden_channels)
    if cluster is not None:
        # One xgboost.dask fit at a time: two would each hold some workers' only thread while
        # waiting for the others' (a deadlock).
        controls_done.result()
    t = time.perf_counter()
    booster, scores = _fit_xgboost(x_emb, y, xgb_s, device, seed, cluster)
    seconds["xgboost"] = time.perf_counter() - t
    del x_emb
    say(f"XGBoost on GNN embeddings: {booster.num_boosted_rounds()} rounds kept (early stopping)", flush=True)

    control_boosters, control_scores, seconds["baseline"] = controls_done.result()
    boosters = {"gnn_xgboost": booster, **control_boosters}
    all_scores = {"gnn_xgboost": scores, **control_scores}

    result_metrics = {name: _evaluate(y, s, alert_rate) for name, s in all_scores.items()}
    threshold = result_metrics["gnn_xgboost"]["validation"]["threshold"]
    t = time.perf_counter()
    meta = {
        "architecture": architecture,
        "features": {"user": list(test.user_features), "merchant": list(test.merchant_features),
                     "edge": list(test.edge_features), "xgboost": names["gnn_xgboost"]},
        "feature_masks": {"user": np.asarray(test.feature_mask_user).tolist(),
                          "merchant": np.asarray(test.feature_mask_merchant).tolist(),
                          "edge": np.asarray(test.feature_mask_edge).tolist()},
        "hyperparameters": {"gnn": dataclasses.asdict(gnn_s), "xgb": dataclasses.asdict(xgb_s),
                            "gnn_learning_rate": GNN_LEARNING_RATE,
                            "early_stopping_rounds": EARLY_STOPPING_ROUNDS, "seed": seed},
        "xgboost_rounds": booster.num_boosted_rounds(),
        "xgboost_trees_per_round": 1,  # the num_parallel_tree trees would be identical (_xgb_params)
        "threshold": threshold,
        "threshold_rule": "F1-max on validation" if alert_rate is None else f"alert rate {alert_rate:g} on validation",
        "manifest_hash": manifest_hash(graph_dir),
        "metrics": result_metrics["gnn_xgboost"],
    }
    model_dir = model_export.export_model(out_dir, model, booster, meta)
    seconds["export"] = time.perf_counter() - t
    say(f"model package written to {model_dir}", flush=True)

    return TrainResult(
        model_dir=model_dir, metrics=result_metrics, seconds=seconds, curve=curve,
        test_labels=y["test"], test_scores={m: s["test"] for m, s in all_scores.items()},
        feature_importance={m: _importance(b, names[m]) for m, b in boosters.items()},
        gnn_settings=gnn_s, xgb_settings=xgb_s,
        xgboost_rounds={m: b.num_boosted_rounds() for m, b in boosters.items()},
        device=device, boosters=boosters, graph_size=graph_size(train_part, test),
    )


@torch.no_grad()
def _test_input(model: gnn.FraudGNN, graph: Graph, device: str) -> EdgeBatches:
    """XGBoost input of the test edges over the whole test graph, as ``model.edge_features``
    computes it (the node embeddings of one pass over the graph, then each edge's row), built
    per batch of edges."""
    rows, n = model.edge_feature_rows(*_tensors(compact(graph), device))
    return EdgeBatches(n, lambda start, stop: rows(start, stop).cpu().numpy())


def _feature_names(graph: Graph, hidden: int) -> dict[str, list[str]]:
    user = [f"user:{n}" for n in graph.user_features]
    merchant = [f"merchant:{n}" for n in graph.merchant_features]
    edge = [f"edge:{n}" for n in graph.edge_features]
    h_user = [f"user:h{i}" for i in range(hidden)]
    h_merchant = [f"merchant:h{i}" for i in range(hidden)]
    row_edge = [f"edge:{n}" for n in graph.edge_features if n not in features.NAMES]
    return {"gnn_xgboost": user + h_user + merchant + h_merchant + edge, "baseline": user + merchant + row_edge,
            "graph_features": user + merchant + edge}
