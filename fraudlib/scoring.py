"""Scoring against the served champion, always inside graph context.

A transaction's score depends on its card's and merchant's neighbourhood (the GNN's
``n_hops`` hops), so a transaction is never scored as a lone one-edge graph: it is sent
with its *receptive field*, every edge whose messages reach its endpoints' embeddings.
With that context the score equals the score inside the whole graph, at a fraction of the
request size.

One scoring path (:func:`score_frame`) serves the served champion (``fraud score``, through
Triton) and the registered MLflow model (in-process, ``tracking.TransactionScorer``): they
differ only in the function that scores a graph. This module imports neither Triton nor MLflow
at the top, so the MLflow model loads with its own requirements.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd

from fraudlib import graph_store
from fraudlib.graph_store import Graph, compact, read_encoders, read_part
from fraudlib.tabformer import COLUMNS, LABEL, read_transactions

if TYPE_CHECKING:
    from fraudlib.triton_server import TritonClient

log = logging.getLogger(__name__)

NEW_SPLIT = "new"
# What score_frame returns per row, column -> MLflow type name (``Is Fraud?`` follows when
# given): the logged MLflow model's output signature (a test keeps it what MLflow infers).
OUTPUT_TYPES = {"User": "integer", "Card": "integer", "Merchant Name": "long", "Amount": "double",
                "fraud_probability": "double", "note": "string"}
# The files of a graph directory that scoring new rows reads: a model that travels carries them.
CONTEXT_FILES = ("manifest.json", "encoders.json", "history.parquet", "test_edges.parquet", "gnn/test_gnn")


def field_hops(architecture: dict) -> int:
    """The ``n_hops`` of :func:`receptive_field` for a model's ``architecture`` (its meta.json):
    its GNN layers, and one more when its node inputs average their edges' features
    (``edge_means``): a node ``n_hops`` away then reads all its own edges too."""
    return int(architecture["n_hops"]) + (1 if architecture.get("edge_means", 0) else 0)


def receptive_field(graph: Graph, targets: np.ndarray, n_hops: int = 2) -> np.ndarray:
    """Indices of the edges an ``n_hops``-layer GNN reads to embed the targets' endpoints
    (pass :func:`field_hops` of a model's architecture).

    Layer k of a node's embedding aggregates over *all* its edges, using layer k-1 of its
    neighbours; so the edges needed are those incident to any node within ``n_hops - 1``
    hops of a target edge's endpoints.
    """
    return _field(graph.edge_index, graph.x_user.shape[0], graph.x_merchant.shape[0], targets, n_hops)


def _field(edge_index: np.ndarray, n_users: int, n_merchants: int, targets: np.ndarray, n_hops: int) -> np.ndarray:
    users = np.zeros(n_users, dtype=bool)
    merchants = np.zeros(n_merchants, dtype=bool)
    src, dst = edge_index
    users[src[targets]] = True
    merchants[dst[targets]] = True
    for _ in range(n_hops - 1):
        touching = users[src] | merchants[dst]
        users[src[touching]] = True
        merchants[dst[touching]] = True
    return np.flatnonzero(users[src] | merchants[dst])


def feature_groups(names: list[str], mask) -> list[str]:
    """One readable name per feature group (the columns sharing a mask id, e.g. City bits)."""
    groups: dict[int, list[str]] = {}
    for name, group in zip(names, np.asarray(mask).tolist()):
        groups.setdefault(int(group), []).append(name)
    out = []
    for _, members in sorted(groups.items()):
        stem = members[0].rsplit("_", 1)[0] if len(members) > 1 else members[0]
        out.append(stem)
    return out


@dataclass
class Example:
    edge: int
    user: int
    merchant: int
    label: int
    score: float  # scored inside its receptive field, with Shapley values
    whole_graph_score: float  # the same edge scored inside the whole graph
    context_edges: int
    shapley: dict  # group -> values: user, merchant, edge
    group_names: dict  # group -> names
    receptive_field: int = 0  # > context_edges: the context is a uniform sample of it (the cap)


def champion_graph_dir() -> Path:
    from fraudlib import registry

    champion = registry.champion()
    if champion is None:
        raise LookupError("the registry has no champion yet: run the pipeline (make run) first")
    graph_dir = registry.graph_dir_of(champion)
    if graph_dir is None:
        raise LookupError(f"the champion's training run {champion.run_id} has no graph_dir tag: "
                          "pass the graph directory explicitly")
    return graph_dir


def champion_meta(client: TritonClient) -> dict:
    from fraudlib.lifecycle import repository

    repo = repository(client)
    version = repo.state().champion
    if version is None:
        raise LookupError(f"no champion is served from {repo.root}: run the pipeline (make run) first")
    return json.loads((repo.version_dir(version) / "meta.json").read_text())


def _predict(client: TritonClient, graph: Graph, shap: bool = False) -> dict:
    from fraudlib.triton_repo import PUBLIC_MODEL, graph_inputs

    # No version named: this is what any client of the public model gets, i.e. the champion.
    return client.infer(PUBLIC_MODEL, graph_inputs(graph, compute_shap=shap))


# How a graph is scored: predict(graph, positions) -> the probabilities of the edges at positions.
Predict = Callable[[Graph, np.ndarray], np.ndarray]


def served_champion(client: TritonClient) -> Predict:
    """Edge probabilities from the served champion (the public model, no version named); the
    serving contract scores every edge of the graph sent, the positions are taken from them."""
    return lambda graph, positions: np.asarray(_predict(client, graph)["PREDICTION"]).reshape(-1)[positions]


def max_shap_edges(config_text: str) -> int | None:
    """The most edges a model explains per request: its config.pbtxt's max_shap_edges parameter."""
    found = re.search(r'key:\s*"max_shap_edges"\s*value:\s*\{\s*string_value:\s*"(\d+)"', config_text)
    return int(found.group(1)) if found else None


def explanation_cap(client: TritonClient) -> int | None:
    from fraudlib.lifecycle import repository
    from fraudlib.triton_repo import PACKAGE_CONFIG

    repo = repository(client)
    return max_shap_edges((repo.version_dir(repo.state().champion) / PACKAGE_CONFIG).read_text())


def _kept_scores(run_dir: Path | str, meta: dict, graph_dir: Path | str) -> Path:
    """Where a run folder keeps a model's scores (the model named by its meta.json) of a graph
    directory's test edges (named by its manifest)."""
    manifest = Path(graph_dir) / graph_store.MANIFEST
    graph = manifest.read_bytes() if manifest.is_file() else str(Path(graph_dir).resolve()).encode()
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode() + graph).hexdigest()[:24]
    return Path(run_dir) / "scores" / f"test-{key}.npy"


def keep_test_scores(run_dir: Path | str, meta: dict, graph_dir: Path | str, scores: np.ndarray) -> None:
    """Keep the scores a stage computed of ``graph_dir``'s test edges (every one, in their
    order) by the model whose meta.json is ``meta``, for a later stage of the run (the deploy
    stage's example) not to score the whole test period again."""
    path = _kept_scores(run_dir, meta, graph_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.npy")
    np.save(tmp, np.asarray(scores).reshape(-1))
    os.replace(tmp, path)


def kept_test_scores(run_dir: Path | str, meta: dict, graph_dir: Path | str) -> np.ndarray | None:
    path = _kept_scores(run_dir, meta, graph_dir)
    return np.load(path) if path.is_file() else None


def explain_example(client: TritonClient, graph_dir: Path | str | None = None,
                    run_dir: Path | str | None = None) -> Example:
    """The champion's highest-scored test transaction whose context the champion explains
    (at most its ``max_shap_edges``), with its Shapley values.

    The test part holds every transaction of the test period, so a transaction's receptive
    field can exceed the cap; when all of the 100 highest-scored do, the highest is explained
    inside a uniform sample of its receptive field cut to the cap (seeded; the GNN was trained
    on uniform samples of the stream), and ``Example.receptive_field`` says so. The test
    edges' scores are those ``run_dir`` keeps for the champion and graph (``keep_test_scores``)
    when it does, else scored here."""
    graph_dir = Path(graph_dir) if graph_dir else champion_graph_dir()
    meta = champion_meta(client)
    n_hops = field_hops(meta["architecture"])
    test = read_part(graph_dir, "test")
    whole = kept_test_scores(run_dir, meta, graph_dir) if run_dir else None
    if whole is None or len(whole) != test.num_edges:
        whole = np.asarray(_predict(client, test)["PREDICTION"]).reshape(-1)
    cap = explanation_cap(client)
    top = np.argsort(-whole, kind="stable")[:100].tolist()
    fields = {}
    # An edge whose field surely exceeds the cap is passed over without computing its field (at
    # 100M rows each is a pass over 6.2M edges, 22 s for the top 100, which all exceed it).
    over = _FieldBound(test, n_hops) if cap is not None else None
    for edge in top:
        if over is not None and over.exceeds(edge, cap):
            continue
        fields[edge] = receptive_field(test, np.array([edge]), n_hops)
        if cap is None or fields[edge].size <= cap:
            break
    else:
        edge = top[0]
    field = whole_field = fields[edge] if edge in fields else receptive_field(test, np.array([edge]), n_hops)
    if cap is not None and field.size > cap:  # a uniform sample of the field, the edge itself kept
        others = field[field != edge]
        field = np.sort(np.r_[np.random.default_rng(0).choice(others, cap - 1, replace=False), edge])
    mask = np.zeros(test.num_edges, dtype=bool)
    mask[field] = True
    sub, position = test.edges(mask), int(np.searchsorted(field, edge))
    out = _predict(client, sub, shap=True)
    shapley = {group: np.asarray(out[f"shap_values_{name}"])[position]
               for group, name in (("user", "user"), ("merchant", "merchant"), ("edge", "user_to_merchant"))}
    names = {"user": feature_groups(test.user_features, test.feature_mask_user),
             "merchant": feature_groups(test.merchant_features, test.feature_mask_merchant),
             "edge": feature_groups(test.edge_features, test.feature_mask_edge)}
    return Example(edge, int(test.edge_index[0, edge]), int(test.edge_index[1, edge]), int(test.label[edge]),
                   float(np.asarray(out["PREDICTION"]).reshape(-1)[position]), float(whole[edge]),
                   sub.num_edges, shapley, names, receptive_field=int(whole_field.size))


class Adjacency:
    """Each node's edges, per side (0: users, 1: merchants), over an edge index (built once for
    many ``sampled_field`` calls on one graph: a sort of its edges)."""

    def __init__(self, edge_index: np.ndarray, n_users: int, n_merchants: int):
        self.ends = edge_index
        self.degree = [np.bincount(ends, minlength=n) for ends, n in zip(edge_index, (n_users, n_merchants))]
        self.order = [np.argsort(ends, kind="stable") for ends in edge_index]  # edges by node
        self.start = [np.r_[0, np.cumsum(d)] for d in self.degree]

    def sample(self, side: int, nodes: np.ndarray, fanout: int, rng: np.random.Generator) -> np.ndarray:
        """Every edge of those of ``nodes`` with at most ``fanout``, and ``fanout`` uniform draws
        (with replacement: the work is fanout x nodes, whatever their degrees) of the others'."""
        counts, starts = self.degree[side][nodes], self.start[side][nodes]
        few = counts <= fanout
        first = np.repeat(np.cumsum(counts[few]) - counts[few], counts[few])  # each slot's node's first slot
        all_of = np.repeat(starts[few], counts[few]) + np.arange(first.size) - first
        many = ~few
        drawn = starts[many, None] + (rng.random((int(many.sum()), fanout)) * counts[many, None]).astype(np.int64)
        return self.order[side][np.r_[all_of, drawn.ravel()]]


def sampled_field(graph: Adjacency, targets: np.ndarray, n_hops: int, fanout: int, seed: int = 0) -> np.ndarray:
    """A sample of the targets' receptive field (sorted edge positions): the field's hops
    (``_field``) with at most ``fanout`` edges of each node drawn at each hop (seeded,
    ``Adjacency.sample``), the targets themselves kept. At most 2 x (fanout + fanout^2 + ...)
    edges a target, whatever the degrees: a transaction in a sample of its context, as the GNN
    was trained (messages pass over a uniform sample of the stream; every node reads means)."""
    if fanout < 1:
        raise ValueError(f"fanout must be >= 1 edge per node and hop, got {fanout}")
    edge_index, rng = graph.ends, np.random.default_rng(seed)
    reached = [np.zeros(d.size, dtype=bool) for d in graph.degree]
    edges = [np.asarray(targets, dtype=np.int64)]
    frontier = [np.unique(edge_index[0][targets]), np.unique(edge_index[1][targets])]
    for _ in range(n_hops):
        for side in (0, 1):
            reached[side][frontier[side]] = True
        picked = np.concatenate([graph.sample(side, frontier[side], fanout, rng) for side in (0, 1)])
        edges.append(picked)
        frontier = [np.unique(nodes[~seen[nodes]]) for nodes, seen in zip(edge_index[:, picked], reached)]
    return np.unique(np.concatenate(edges))


class _FieldBound(Adjacency):
    """Whether an edge's receptive field surely holds more than ``cap`` edges, from a lower
    bound grown hop by hop over an adjacency index: the field holds every edge of its nodes, so
    at least the sum of its users' degrees (each edge has one user), and of its merchants'."""

    def __init__(self, graph: Graph, n_hops: int):
        super().__init__(graph.edge_index, graph.x_user.shape[0], graph.x_merchant.shape[0])
        self.n_hops = n_hops

    def _neighbours(self, side: int, nodes: np.ndarray) -> np.ndarray:
        edges = np.concatenate([self.order[side][self.start[side][n]:self.start[side][n + 1]] for n in nodes])
        return np.unique(self.ends[1 - side][edges])

    def exceeds(self, edge: int, cap: int) -> bool:
        nodes = [np.array([self.ends[0][edge]]), np.array([self.ends[1][edge]])]  # users, merchants
        for _ in range(self.n_hops - 1):
            if max(self.degree[side][nodes[side]].sum() for side in (0, 1)) > cap:
                return True
            # each side's degrees sum to <= cap here: the expansion reads at most 2 * cap edges
            nodes = [np.union1d(nodes[side], self._neighbours(1 - side, nodes[1 - side])) for side in (0, 1)]
        return max(self.degree[side][nodes[side]].sum() for side in (0, 1)) > cap


def append_edges(graph: Graph, user_ids: np.ndarray, merchant_ids: np.ndarray, edge_attr: np.ndarray) -> Graph:
    """The graph with new (unlabelled) edges appended after its own (itself when there are none)."""
    n = len(user_ids)
    if n == 0:
        return graph
    return dataclasses.replace(
        graph,
        edge_index=np.hstack([graph.edge_index, np.vstack([user_ids, merchant_ids]).astype(np.int64)]),
        edge_attr=np.vstack([graph.edge_attr, edge_attr.astype(np.float32)]),
        label=np.concatenate([graph.label, np.full(n, -1, dtype=np.int64)]),
        split=np.concatenate([graph.split, np.full(n, NEW_SPLIT, dtype=object)]),
        year=None,  # new rows carry no year: the graph is scored as one period
    )


def _held(context: Graph, user_ids: np.ndarray, merchant_ids: np.ndarray, edge_attr: np.ndarray) -> np.ndarray:
    """Each row's edge in ``context`` when it is that transaction (same card, merchant and
    features, e.g. a row of the test period scored again: not a duplicate that would change its
    neighbours' messages), else -1."""
    def keys(u, m, attr):
        table = np.column_stack([u.astype(np.float64), m.astype(np.float64), attr.astype(np.float32).astype(np.float64)])
        return [row.tobytes() for row in np.ascontiguousarray(table)]

    # Only the context's edges between a row's card and merchant can be that row (the context
    # is ~1.5M edges at full size: keyed whole, it took seconds per call).
    merchants = int(max(context.edge_index[1].max(initial=-1), merchant_ids.max(initial=-1))) + 1
    pairs = context.edge_index[0].astype(np.int64) * merchants + context.edge_index[1]
    candidates = np.flatnonzero(np.isin(pairs, user_ids.astype(np.int64) * merchants + merchant_ids))
    held = {}
    for i, key in zip(candidates, keys(*context.edge_index[:, candidates], context.edge_attr[candidates])):
        held.setdefault(key, int(i))
    return np.array([held.get(k, -1) for k in keys(user_ids, merchant_ids, edge_attr)], dtype=np.int64)


def read_rows(path: Path | str) -> pd.DataFrame:
    """New raw rows from a TabFormer-format file, validated (``Is Fraud?`` optional)."""
    return read_transactions(path, label_required=False)


def parse_raw(raw: pd.DataFrame) -> pd.DataFrame:
    """Raw TabFormer rows held as text (``pd.read_csv(path, dtype=str)``) parsed and validated
    by the one reader, as a file of them would be (lines counted from 2, the header's 1)."""
    missing = [c for c in COLUMNS if c not in raw.columns and c != LABEL]
    if missing:
        raise ValueError(f"the rows lack the TabFormer column(s) {missing}; they have {list(raw.columns)}")
    with tempfile.TemporaryDirectory(prefix="fraud-rows-") as tmp:
        path = Path(tmp) / "rows.csv"
        raw[[c for c in COLUMNS if c in raw.columns]].to_csv(path, index=False)
        return read_rows(path)


def raw_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Parsed rows (as ``read_transactions`` returns them) back as TabFormer text, the form
    :func:`parse_raw` reads: ``$134.09``, ``HH:MM``, ``Yes``/``No``, empty for missing."""
    def text(column, fmt):
        return [fmt(v) if pd.notna(v) else "" for v in frame[column].tolist()] if column in frame else \
            [""] * len(frame)
    out = pd.DataFrame({
        "User": frame["User"].astype("int64").astype(str), "Card": frame["Card"].astype("int64").astype(str),
        "Year": frame["Year"].astype("int64").astype(str), "Month": frame["Month"].astype("int64").astype(str),
        "Day": frame["Day"].astype("int64").astype(str),
        "Time": [f"{int(m) // 60:02d}:{int(m) % 60:02d}" for m in frame["Time"].tolist()],
        "Amount": [f"${a:.2f}" for a in frame["Amount"].tolist()],
        "Use Chip": frame["Use Chip"].astype(str),
        "Merchant Name": frame["Merchant Name"].astype("int64").astype(str),
        "Merchant City": frame["Merchant City"].astype(str),
        "Merchant State": text("Merchant State", str), "Zip": text("Zip", lambda z: f"{float(z):.1f}"),
        "MCC": frame["MCC"].astype("int64").astype(str), "Errors?": text("Errors?", str),
    })
    if LABEL in frame:
        out[LABEL] = np.where(frame[LABEL].to_numpy() == 1, "Yes", "No")
    return out.reset_index(drop=True)


def score_frame(frame: pd.DataFrame, graph_dir: Path | str, predict: Predict, n_hops: int,
                fanout: int | None = None) -> pd.DataFrame:
    """Fraud probabilities of parsed raw rows (``read_rows``), by ``predict`` (a graph's edge
    probabilities: the served champion, or a model loaded in-process).

    Rows are encoded with the graph directory's saved encoders (their causal features computed
    from the history saved with it, as preprocessing computed them) and scored inside their
    context: its test graph (the latest labelled transactions) with the new rows placed in it
    (``score_in_context``), cut to the new rows' receptive field (with ``fanout``, a sample of
    it: ``sampled_field``). A row whose card or merchant the model never saw has no node to
    attach to and is reported unscored. One row out per row in:
    ``User``, ``Card``, ``Merchant Name``, ``Amount``, ``fraud_probability`` (NaN: unscored),
    ``note``, and ``Is Fraud?`` when the rows have it; ``attrs["context_edges"]``.
    """
    from fraudlib.preprocess import encode_transactions, with_causal_features

    graph_dir = Path(graph_dir)
    encoders = read_encoders(graph_dir)
    users, merchants, edge_attr = encode_transactions(with_causal_features(frame, graph_dir, encoders), encoders)
    context = read_part(graph_dir, "test")
    if edge_attr.shape[1] != context.edge_attr.shape[1]:
        raise ValueError(f"the rows encode to {edge_attr.shape[1]} edge features but the model's graph "
                         f"{graph_dir} has {context.edge_attr.shape[1]}")
    known = (users >= 0) & (merchants >= 0)
    scores = np.full(len(frame), np.nan)
    context_edges = 0
    if known.any():
        scores[known], context_edges = score_in_context(context, users[known], merchants[known], edge_attr[known],
                                                        predict, n_hops, fanout)
    log.info("scored %d of %d rows inside a context of %d edges", int(known.sum()), len(frame), context_edges)
    out = pd.DataFrame({
        "User": frame["User"].to_numpy(), "Card": frame["Card"].to_numpy(),
        "Merchant Name": frame["Merchant Name"].astype("int64").to_numpy(),
        "Amount": frame["Amount"].to_numpy(),
        "fraud_probability": scores,
        "note": np.where(known, "", "card or merchant unknown to the model: not scored"),
    })
    if LABEL in frame:
        out[LABEL] = frame[LABEL].to_numpy()
    out.attrs["context_edges"] = context_edges
    return out


def score_in_context(context: Graph, user_ids: np.ndarray, merchant_ids: np.ndarray, edge_attr: np.ndarray,
                     predict: Predict, n_hops: int, fanout: int | None = None) -> tuple[np.ndarray, int]:
    """Probabilities of encoded rows placed in ``context`` (a row that is an edge of it is that
    edge, ``_held``; the others are appended after its edges), the graph cut to the rows'
    receptive field (``n_hops``: ``field_hops``) and scored by ``predict``; and that graph's
    number of edges. The field is found on the edge index alone and only its edges are gathered
    (at 100M rows the context is 6.2M edges); a field of most of the context is scored in the
    whole context instead (no edge outside the field reaches the rows: the same scores). With
    ``fanout``, in a sample of the field instead (``sampled_field``): milliseconds a row,
    approximate scores."""
    found = _held(context, user_ids, merchant_ids, edge_attr)
    fresh = found < 0
    found[fresh] = context.num_edges + np.arange(int(fresh.sum()))
    edge_index = np.hstack([context.edge_index, np.vstack([user_ids[fresh], merchant_ids[fresh]])])
    sizes = context.x_user.shape[0], context.x_merchant.shape[0]
    keep = _field(edge_index, *sizes, found, n_hops) if fanout is None else \
        sampled_field(Adjacency(edge_index, *sizes), found, n_hops, fanout)
    kept = keep[keep < context.num_edges]
    if fanout is None and 2 * len(kept) > context.num_edges:  # scored whole, not gathered (2.9 s at 100M)
        kept = np.arange(context.num_edges)
    sub = context if len(kept) == context.num_edges else context.edges(kept)
    sub = append_edges(sub, user_ids[fresh], merchant_ids[fresh], edge_attr[fresh])
    positions = np.where(fresh, len(kept) + np.cumsum(fresh) - 1, np.searchsorted(kept, found))
    return np.asarray(predict(sub, positions), dtype=np.float64).reshape(-1), sub.num_edges


def score_in_process(model, frame: pd.DataFrame, graph_dir: Path | str, fanout: int | None = None) -> pd.DataFrame:
    """:func:`score_frame` with a model loaded in-process (``model_export.load_model``)."""
    return score_frame(frame, graph_dir, lambda graph, positions: model.predict(compact(graph), positions),
                       field_hops(model.meta["architecture"]), fanout)


def score_transactions(client: TritonClient, rows: pd.DataFrame | Path | str,
                       graph_dir: Path | str | None = None, fanout: int | None = None) -> pd.DataFrame:
    """:func:`score_frame` by the served champion (the public model, no version named), on
    the champion's graph directory; ``rows`` parsed (``read_rows``) or a file of them."""
    frame = rows if isinstance(rows, pd.DataFrame) else read_rows(rows)
    graph_dir = Path(graph_dir) if graph_dir else champion_graph_dir()
    meta = champion_meta(client)
    return score_frame(frame, graph_dir, served_champion(client), field_hops(meta["architecture"]), fanout)


def label_metrics(scored: pd.DataFrame, threshold: float) -> dict | None:
    """Metrics of the scored rows that carry a label (``Is Fraud?``) at the model's
    ``threshold``: counts always, AUPRC and ROC AUC when both classes are among them."""
    if LABEL not in scored:
        return None
    from fraudlib import metrics

    rows = scored[scored["fraud_probability"].notna()]
    labels, scores = rows[LABEL].to_numpy().astype(int), rows["fraud_probability"].to_numpy()
    out = {"rows": len(rows), "fraud": int(labels.sum()), "threshold": float(threshold)}
    if 0 < labels.sum() < len(labels):
        report = metrics.report(labels, scores, threshold)
        out.update({k: report[k] for k in ("auprc", "roc_auc", "precision_at_threshold",
                                           "recall_at_threshold", "alert_rate_at_threshold")})
    elif len(labels):
        flagged = scores >= threshold
        out.update({"alert_rate_at_threshold": float(flagged.mean()),
                    "note": "one class only: AUPRC and ROC AUC need fraud and non-fraud rows"})
    return out


def write_scores(scored: pd.DataFrame, out: Path | str) -> Path:
    """The scores as CSV or Parquet (by ``out``'s suffix), written to a temporary file beside
    ``out`` and renamed into place."""
    out = Path(out)
    kind = output_format(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        if kind == "parquet":
            scored.to_parquet(tmp, index=False)
        else:
            scored.to_csv(tmp, index=False)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def output_format(out: Path | str) -> str:
    """``csv`` or ``parquet`` from the suffix of ``out``; a folder that does not exist or
    another suffix is a ValueError (checked before any scoring)."""
    out = Path(out)
    kind = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}.get(out.suffix.lower())
    if kind is None:
        raise ValueError(f"--out {out}: the file name must end in .csv or .parquet (it picks the format)")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: the folder {out.parent} does not exist")
    return kind
