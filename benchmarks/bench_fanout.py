"""Scoring a transaction in a sample of its receptive field (`fraud score --fanout K`): what it
costs in AUPRC and what it saves in time, against the exact field.

    .venv/bin/python benchmarks/bench_fanout.py                     # the newest `make run` model and graph
    .venv/bin/python benchmarks/bench_fanout.py --package runs/<run>/model/prediction_and_shapley \\
        --graph-dir runs/<run>/graph --fanouts 5,10,20 --seeds 3

The model is loaded in-process (the served model's code). Exact scores: every test edge scored
in the whole test graph, as the evaluate stage scores them. Rows: every fraud edge of the test
period and a uniform sample of the others (``--rows``), weighted back to the test period's
fraud rate in the AUPRC (each sampled legitimate row counts for all it stands for). Each row is
then scored on its own, inside ``scoring.sampled_field`` of its receptive field (at most K
edges of each node at each hop), once per sampler seed. Printed per fanout and seed: AUPRC of
the sampled scores against the exact ones on the same rows, with the paired (stratified)
bootstrap 95% interval of the difference; the mean absolute difference of the probabilities;
the request's edges (p50 / max); and the time per row of sampling plus scoring (p50 / p99, one
thread, in-process: the request a client would send Triton, built and scored).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def weighted_auprc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> float:
    """Average precision with weighted rows (ties: one threshold per distinct score)."""
    order = np.argsort(-scores, kind="stable")
    y, w, s = labels[order], weights[order], scores[order]
    tp, fp = np.cumsum(w * y), np.cumsum(w * (1 - y))
    last = np.r_[s[1:] != s[:-1], True]  # the last row of each distinct score
    tp, fp = tp[last], fp[last]
    recall_step = np.diff(np.r_[0.0, tp]) / tp[-1]
    return float(np.sum(recall_step * tp / np.maximum(tp + fp, 1e-12)))


def paired_interval(labels, first, second, weights, n_boot: int = 300, seed: int = 0) -> tuple[float, float]:
    """95% interval of weighted AUPRC(first) - AUPRC(second), resampling fraud and legitimate rows apart."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)]
    deltas = []
    for _ in range(n_boot):
        take = np.concatenate([rng.choice(g, g.size) for g in groups])
        deltas.append(weighted_auprc(labels[take], first[take], weights[take])
                      - weighted_auprc(labels[take], second[take], weights[take]))
    return tuple(float(q) for q in np.quantile(deltas, [0.025, 0.975]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", type=Path, default=None, help="model package (default: the newest `make run`)")
    parser.add_argument("--graph-dir", type=Path, default=None, help="its graph directory (default: that run's)")
    parser.add_argument("--fanouts", default="5,10,20", help="comma-separated fanouts (default 5,10,20)")
    parser.add_argument("--seeds", type=int, default=3, help="sampler seeds per fanout (default 3)")
    parser.add_argument("--rows", type=int, default=3000, help="non-fraud test rows sampled (default 3000)")
    args = parser.parse_args(argv)
    import torch

    from bench_triton import default_package
    from fraudlib import metrics
    from fraudlib.graph_store import compact, read_part
    from fraudlib.model_export import load_model
    from fraudlib.scoring import Adjacency, field_hops, sampled_field

    if args.package is None:
        args.package, default_graph = default_package()
        args.graph_dir = args.graph_dir or default_graph
    torch.set_num_threads(1)
    model = load_model(args.package)
    n_hops = field_hops(model.meta["architecture"])
    test = read_part(args.graph_dir, "test")
    t = time.perf_counter()
    exact = model.predict(test)
    whole_s = time.perf_counter() - t
    rng = np.random.default_rng(0)
    fraud = np.flatnonzero(test.label == 1)
    rows = np.sort(np.r_[fraud, rng.choice(np.flatnonzero(test.label == 0), args.rows, replace=False)])
    labels = test.label[rows]
    weights = np.where(labels == 1, 1.0, (test.label == 0).sum() / args.rows)
    graph = Adjacency(test.edge_index, test.x_user.shape[0], test.x_merchant.shape[0])
    print(f"{args.package} on the test part of {args.graph_dir}: {test.num_edges:,} edges, a {n_hops}-hop field; "
          f"exact scores of every edge in the whole graph: {whole_s:.1f} s")
    print(f"rows: {fraud.size:,} fraud + {args.rows:,} others; exact AUPRC on them, weighted to the test "
          f"period's fraud rate: {weighted_auprc(labels, exact[rows], weights):.4f} (all test edges: "
          f"{metrics.auprc(test.label, exact):.4f})")
    print("fanout | seed | AUPRC sampled | minus exact [95% interval] | mean |dp| | edges p50 / max | ms p50 / p99")
    for fanout in (int(f) for f in args.fanouts.split(",")):
        for seed in range(args.seeds):
            scores, edges, ms = np.empty(rows.size), np.empty(rows.size, dtype=np.int64), np.empty(rows.size)
            for i, row in enumerate(rows):
                t = time.perf_counter()
                field = sampled_field(graph, np.array([row]), n_hops, fanout, seed=seed)
                scores[i] = model.predict(compact(test.edges(field)), np.searchsorted(field, [row]))[0]
                ms[i] = (time.perf_counter() - t) * 1000
                edges[i] = field.size
            sampled, whole = weighted_auprc(labels, scores, weights), weighted_auprc(labels, exact[rows], weights)
            low, high = paired_interval(labels, scores, exact[rows], weights, seed=seed)
            print(f"{fanout} | {seed} | {sampled:.4f} | {sampled - whole:+.4f} [{low:+.4f}, {high:+.4f}] | "
                  f"{np.abs(scores - exact[rows]).mean():.4f} | {int(np.median(edges)):,} / {edges.max():,} | "
                  f"{np.percentile(ms, 50):.2f} / {np.percentile(ms, 99):.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
