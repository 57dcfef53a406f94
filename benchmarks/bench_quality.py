"""Does the model earn its graph? Test AUPRC, with bootstrap 95% intervals, of three models
over several generator seeds and regimes:

* ``baseline``: XGBoost on the row alone (card and merchant id codes, the row's columns);
* ``graph_features``: XGBoost on the row plus the causal graph/time features (fraudlib.features);
* ``gnn_xgboost``: the full model (GNN embeddings + XGBoost on the row and the features).

Regimes (``fraudlib.synthetic.REGIMES``): ``default`` (every fraud mechanism, legitimate
look-alikes, drift), one mechanism at a time, and ``row_only``, a control whose fraud has no
graph structure (the features must not hurt there).

    .venv/bin/python benchmarks/bench_quality.py                          # 3 seeds x 5 regimes at 5M rows
    .venv/bin/python benchmarks/bench_quality.py --rows 1000000 --seeds 0 --regimes default row_only
    .venv/bin/python benchmarks/bench_quality.py --feature-set blueprint  # today's blueprint features
    .venv/bin/python benchmarks/bench_quality.py --deduplicate   # the blueprint's row selection

Each (regime, seed) runs in a child process (generate, preprocess, train), prints its line
as it finishes, and the table at the end is Markdown (docs/model_quality.md holds the last
one). Data files are cached under --work (one per regime, seed and size).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

MODELS = ("baseline", "graph_features", "gnn_xgboost")


def _child(args) -> None:
    """One (regime, seed): generate (cached), preprocess, train; JSON on the last stdout line."""
    from fraudlib import metrics
    from fraudlib.preprocess import preprocess
    from fraudlib.synthetic import generate
    from fraudlib.training import train

    work = Path(args.work)
    raw = work / "data" / f"{args.regime}-{args.rows}-seed{args.seed}.csv"
    if not raw.is_file():
        generate(raw, args.rows, seed=args.seed, regime=args.regime)
    case = work / (f"{args.regime}-{args.rows}-seed{args.seed}-{args.feature_set}"
                   + ("-dedup" if args.deduplicate else ""))
    t = time.perf_counter()
    summary = preprocess(raw, case / "graph", feature_set=args.feature_set, deduplicate=args.deduplicate)
    preprocess_s = time.perf_counter() - t
    t = time.perf_counter()
    r = train(case / "graph", case / "model", progress=False, seed=args.seed,
              gnn_params={"num_epochs": args.epochs})
    train_s = time.perf_counter() - t
    out = {"regime": args.regime, "seed": args.seed, "rows": args.rows, "feature_set": args.feature_set,
           "deduplicate": args.deduplicate,
           "test_edges": int(len(r.test_labels)), "test_fraud": int(r.test_labels.sum()),
           "preprocess_s": preprocess_s, "train_s": train_s, "edges": summary.edges, "models": {}}
    for model, scores in r.test_scores.items():
        b = metrics.bootstrap(r.test_labels, {model: scores}, "auprc", n_boot=args.boot, seed=args.seed)
        out["models"][model] = {"auprc": b.values[model], "low": b.intervals[model][0],
                                "high": b.intervals[model][1]}
    labels, natural = _natural_rate_scores(raw, case / "graph", r)
    out["natural"] = {"edges": int(len(labels)), "fraud": int(labels.sum()), "models": {}}
    for model, scores in natural.items():
        b = metrics.bootstrap(labels, {model: scores}, "auprc", n_boot=max(args.boot // 5, 50), seed=args.seed)
        out["natural"]["models"][model] = {"auprc": b.values[model], "low": b.intervals[model][0],
                                           "high": b.intervals[model][1]}
    if "graph_features" in r.test_scores:  # paired: the same resampled rows for both models
        b = metrics.bootstrap(r.test_labels, {"gnn_xgboost": r.test_scores["gnn_xgboost"],
                                              "baseline": r.test_scores["baseline"]}, "auprc",
                              n_boot=args.boot, seed=args.seed)
        out["full_minus_baseline"] = {"delta": b.delta, "low": b.delta_interval[0], "high": b.delta_interval[1]}
    print(json.dumps(out))


def _natural_rate_scores(raw: Path, graph_dir: Path, r) -> tuple:
    """Every transaction of the test period (no deduplication, no undersampling: the natural
    fraud rate), scored by the three models of ``r``, the GNN over that whole graph.

    The undersampled test graph holds all fraud and a tenth of the rest, so which edges
    surround a test edge depends on the labels: a GNN can read fraud off the neighbourhood's
    shape (e.g. a card's degree) there, a leak that serving never has. Here it cannot."""
    import numpy as np
    import xgboost as xgb

    from fraudlib import graph_store
    from fraudlib.model_export import load_model
    from fraudlib.preprocess import TRAIN_BEFORE_YEAR, USED_COLUMNS, encode_graph, with_causal_features
    from fraudlib.tabformer import read_transactions
    from fraudlib.training import control_columns, tabular

    encoders = graph_store.read_encoders(graph_dir)
    frame = read_transactions(raw, USED_COLUMNS)
    frame = frame[frame["Year"].to_numpy() > TRAIN_BEFORE_YEAR].reset_index(drop=True)
    graph, _ = encode_graph(with_causal_features(frame, graph_dir, encoders), encoders)
    # The exported package, as Triton serves it.
    scores = {"gnn_xgboost": np.asarray(load_model(r.model_dir).predict(graph)).reshape(-1)}
    for model, columns in control_columns(graph.edge_features).items():
        scores[model] = r.boosters[model].predict(xgb.DMatrix(tabular(graph, columns)))
    return graph.label, scores


def _cell(m: dict | None) -> str:
    return "" if m is None else f"{m['auprc']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"


def _line(r: dict) -> str:
    d = r.get("full_minus_baseline")
    delta = "" if d is None else f"{d['delta']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
    return (f"| {r['regime']} | {r['seed']} | {r['rows']:,} | {r['test_edges']:,} ({r['test_fraud']:,}) | "
            + " | ".join(_cell(r["models"].get(m)) for m in MODELS) + f" | {delta} |")


def _natural_line(r: dict) -> str:
    n = r["natural"]
    return (f"| {r['regime']} | {r['seed']} | {n['edges']:,} ({n['fraud']:,}) | "
            + " | ".join(_cell(n["models"].get(m)) for m in MODELS) + " |")


HEADER = ("| regime | seed | rows | test edges (fraud) | row-only baseline | graph features + XGBoost "
          "| full model (GNN + XGBoost) | full - baseline (paired) |\n|---|---|---|---|---|---|---|---|")
NATURAL_HEADER = ("| regime | seed | test-period transactions (fraud) | row-only baseline | graph features + XGBoost "
                  "| full model (GNN + XGBoost) |\n|---|---|---|---|---|---|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5_000_000, help="rows per generated file (default 5M)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="generator seeds")
    parser.add_argument("--regimes", nargs="+", default=None, help="generator regimes (default: all)")
    parser.add_argument("--feature-set", default="causal", help="causal (default) or blueprint")
    parser.add_argument("--epochs", type=int, default=8, help="GNN epochs (default 8, the stage default)")
    parser.add_argument("--boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--work", default="runs/bench_quality", help="data and outputs (default runs/bench_quality)")
    parser.add_argument("--deduplicate", action="store_true",
                        help="preprocess with the blueprint's deduplication of non-fraud rows")
    parser.add_argument("--json", default=None, help="also write all results to this JSON file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--regime", default="default", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    from fraudlib.synthetic import REGIMES

    regimes = args.regimes or list(REGIMES)
    unknown = sorted(set(regimes) - set(REGIMES))
    if unknown:
        parser.error(f"unknown regime(s) {unknown}; choose from {list(REGIMES)}")
    print(f"bench_quality: {len(regimes)} regime(s) x {len(args.seeds)} seed(s) at {args.rows:,} rows, "
          f"feature set {args.feature_set}, "
          f"{'deduplicated' if args.deduplicate else 'no deduplication'}, {args.boot} bootstrap resamples", flush=True)
    print(HEADER, flush=True)
    results = []
    for regime in regimes:
        for seed in args.seeds:
            t = time.perf_counter()
            cmd = [sys.executable, __file__, "--child", "--regime", regime, "--seed", str(seed),
                   "--rows", str(args.rows), "--feature-set", args.feature_set, "--epochs", str(args.epochs),
                   "--boot", str(args.boot), "--work", args.work]
            cmd += ["--deduplicate"] if args.deduplicate else []
            child = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            if child.returncode != 0:
                raise SystemExit(f"{regime} seed {seed} failed (exit {child.returncode}):\n{child.stdout[-3000:]}")
            r = json.loads(child.stdout.strip().splitlines()[-1])
            r["wall_s"] = time.perf_counter() - t
            results.append(r)
            print(_line(r) + f"  <!-- {r['wall_s']:.0f} s: preprocess {r['preprocess_s']:.1f} s, "
                             f"train {r['train_s']:.1f} s -->", flush=True)
    print("\nTest AUPRC on the undersampled test graph (the pipeline's test edges, ~9% fraud):\n" + HEADER)
    for r in results:
        print(_line(r))
    print("\nTest AUPRC on every transaction of the test period (natural fraud rate, no label-dependent "
          "graph):\n" + NATURAL_HEADER)
    for r in results:
        print(_natural_line(r))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
