"""Scoring against the served champion, always inside graph context.

A transaction's score depends on its card's and merchant's neighbourhood (the GNN's
``n_hops`` hops), so a transaction is never scored as a lone one-edge graph: it is sent
with its *receptive field*, every edge whose messages reach its endpoints' embeddings.
With that context the score equals the score inside the whole graph, at a fraction of the
request size.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fraudlib import registry
from fraudlib.graph_store import Graph, read_encoders, read_part
from fraudlib.lifecycle import repository
from fraudlib.triton_repo import PACKAGE_CONFIG, PUBLIC_MODEL, graph_inputs
from fraudlib.triton_server import TritonClient

NEW_SPLIT = "new"


def receptive_field(graph: Graph, targets: np.ndarray, n_hops: int = 2) -> np.ndarray:
    """Indices of the edges an ``n_hops``-layer GNN reads to embed the targets' endpoints.

    Layer k of a node's embedding aggregates over *all* its edges, using layer k-1 of its
    neighbours; so the edges needed are those incident to any node within ``n_hops - 1``
    hops of a target edge's endpoints.
    """
    users = np.zeros(graph.x_user.shape[0], dtype=bool)
    merchants = np.zeros(graph.x_merchant.shape[0], dtype=bool)
    src, dst = graph.edge_index
    users[src[targets]] = True
    merchants[dst[targets]] = True
    for _ in range(n_hops - 1):
        touching = users[src] | merchants[dst]
        users[src[touching]] = True
        merchants[dst[touching]] = True
    return np.flatnonzero(users[src] | merchants[dst])


def with_context(graph: Graph, targets: np.ndarray, n_hops: int = 2) -> tuple[Graph, np.ndarray]:
    """The targets' receptive field as a graph, and the targets' positions in it."""
    keep = receptive_field(graph, np.asarray(targets), n_hops)
    mask = np.zeros(graph.num_edges, dtype=bool)
    mask[keep] = True
    position = np.cumsum(mask) - 1
    return graph.edges(mask), position[np.asarray(targets)]


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


def champion_graph_dir() -> Path:
    champion = registry.champion()
    if champion is None:
        raise LookupError("the registry has no champion yet: run the pipeline (make run) first")
    graph_dir = registry.graph_dir_of(champion)
    if graph_dir is None:
        raise LookupError(f"the champion's training run {champion.run_id} has no graph_dir tag: "
                          "pass the graph directory explicitly")
    return graph_dir


def champion_meta(client: TritonClient) -> dict:
    repo = repository(client)
    version = repo.state().champion
    if version is None:
        raise LookupError(f"no champion is served from {repo.root}: run the pipeline (make run) first")
    return json.loads((repo.version_dir(version) / "meta.json").read_text())


def _predict(client: TritonClient, graph: Graph, shap: bool = False) -> dict:
    # No version named: this is what any client of the public model gets, i.e. the champion.
    return client.infer(PUBLIC_MODEL, graph_inputs(graph, compute_shap=shap))


def max_shap_edges(config_text: str) -> int | None:
    """The most edges a model explains per request: its config.pbtxt's max_shap_edges parameter."""
    found = re.search(r'key:\s*"max_shap_edges"\s*value:\s*\{\s*string_value:\s*"(\d+)"', config_text)
    return int(found.group(1)) if found else None


def explanation_cap(client: TritonClient) -> int | None:
    repo = repository(client)
    return max_shap_edges((repo.version_dir(repo.state().champion) / PACKAGE_CONFIG).read_text())


def explain_example(client: TritonClient, graph_dir: Path | str | None = None) -> Example:
    """The champion's highest-scored test transaction whose context the champion explains
    (at most its ``max_shap_edges``), with its Shapley values."""
    graph_dir = Path(graph_dir) if graph_dir else champion_graph_dir()
    meta = champion_meta(client)
    n_hops = int(meta["architecture"]["n_hops"])
    test = read_part(graph_dir, "test")
    whole = np.asarray(_predict(client, test)["PREDICTION"]).reshape(-1)
    cap = explanation_cap(client)
    for edge in np.argsort(-whole, kind="stable")[:100].tolist():
        sub, (position,) = with_context(test, np.array([edge]), n_hops)
        if cap is None or sub.num_edges <= cap:
            break
    else:
        raise ValueError(f"the 100 highest-scored test transactions all have contexts above the champion's "
                         f"explanation cap of {cap} edges (max_shap_edges in its config.pbtxt)")
    out = _predict(client, sub, shap=True)
    shapley = {group: np.asarray(out[f"shap_values_{name}"])[position]
               for group, name in (("user", "user"), ("merchant", "merchant"), ("edge", "user_to_merchant"))}
    names = {"user": feature_groups(test.user_features, test.feature_mask_user),
             "merchant": feature_groups(test.merchant_features, test.feature_mask_merchant),
             "edge": feature_groups(test.edge_features, test.feature_mask_edge)}
    return Example(edge, int(test.edge_index[0, edge]), int(test.edge_index[1, edge]), int(test.label[edge]),
                   float(np.asarray(out["PREDICTION"]).reshape(-1)[position]), float(whole[edge]),
                   sub.num_edges, shapley, names)


def append_edges(graph: Graph, user_ids: np.ndarray, merchant_ids: np.ndarray, edge_attr: np.ndarray) -> Graph:
    """The graph with new (unlabelled) edges appended after its own."""
    n = len(user_ids)
    return dataclasses.replace(
        graph,
        edge_index=np.hstack([graph.edge_index, np.vstack([user_ids, merchant_ids]).astype(np.int64)]),
        edge_attr=np.vstack([graph.edge_attr, edge_attr.astype(np.float32)]),
        label=np.concatenate([graph.label, np.full(n, -1, dtype=np.int64)]),
        split=np.concatenate([graph.split, np.full(n, NEW_SPLIT, dtype=object)]),
        year=None,  # new rows carry no year: the graph is scored as one period
    )


def place_rows(context: Graph, user_ids: np.ndarray, merchant_ids: np.ndarray,
               edge_attr: np.ndarray) -> tuple[Graph, np.ndarray]:
    """The context graph with the rows placed in it, and each row's edge: a row that is already
    an edge of the context (same card, merchant and features: the same transaction, e.g. a row
    of the test period scored again) is that edge, not a duplicate that would change its
    neighbours' messages; the others are appended."""
    def keys(u, m, attr):
        table = np.column_stack([u.astype(np.float64), m.astype(np.float64), attr.astype(np.float32).astype(np.float64)])
        return [row.tobytes() for row in np.ascontiguousarray(table)]

    held = {}
    for i, key in enumerate(keys(context.edge_index[0], context.edge_index[1], context.edge_attr)):
        held.setdefault(key, i)
    found = np.array([held.get(k, -1) for k in keys(user_ids, merchant_ids, edge_attr)], dtype=np.int64)
    fresh = found < 0
    graph = append_edges(context, user_ids[fresh], merchant_ids[fresh], edge_attr[fresh])
    found[fresh] = context.num_edges + np.arange(int(fresh.sum()))
    return graph, found


def score_transactions(client: TritonClient, csv_path: Path | str, graph_dir: Path | str | None = None):
    """Fraud probabilities of raw TabFormer-format rows from the served champion.

    Rows are encoded with the champion's saved encoders (their causal features computed from
    the history saved with the champion's graph, as preprocessing computed them) and scored
    inside their context: the champion's test graph (the latest labelled transactions) with
    the new rows placed in it (``place_rows``), cut to the new rows' receptive field. A row
    whose card or merchant the champion never saw has no node to attach to and is reported
    unscored.
    """
    import pandas as pd

    from fraudlib.preprocess import encode_transactions, with_causal_features
    from fraudlib.tabformer import read_transactions

    graph_dir = Path(graph_dir) if graph_dir else champion_graph_dir()
    meta = champion_meta(client)
    encoders = read_encoders(graph_dir)
    frame = read_transactions(csv_path)
    users, merchants, edge_attr = encode_transactions(with_causal_features(frame, graph_dir, encoders), encoders)
    context = read_part(graph_dir, "test")
    if edge_attr.shape[1] != context.edge_attr.shape[1]:
        raise ValueError(f"{csv_path} encodes to {edge_attr.shape[1]} edge features but the champion's graph "
                         f"{graph_dir} has {context.edge_attr.shape[1]}")
    known = (users >= 0) & (merchants >= 0)
    scores = np.full(len(frame), np.nan)
    context_edges = np.zeros(len(frame), dtype=np.int64)
    if known.any():
        graph, targets = place_rows(context, users[known], merchants[known], edge_attr[known])
        sub, positions = with_context(graph, targets, int(meta["architecture"]["n_hops"]))
        predicted = np.asarray(_predict(client, sub)["PREDICTION"]).reshape(-1)
        scores[known] = predicted[positions]
        context_edges[known] = sub.num_edges
    out = pd.DataFrame({
        "line": np.arange(2, len(frame) + 2),
        "User": frame["User"].to_numpy(), "Card": frame["Card"].to_numpy(),
        "Merchant Name": frame["Merchant Name"].astype("int64").to_numpy(),
        "Amount": frame["Amount"].to_numpy(),
        "fraud_probability": scores,
        "note": np.where(known, "", "card or merchant unknown to the champion: not scored"),
    })
    out.attrs["context_edges"] = int(context_edges.max()) if known.any() else 0
    return out
