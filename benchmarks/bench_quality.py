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
    .venv/bin/python benchmarks/bench_quality.py --undersample-test   # the blueprint's test selection

The test set is the pipeline's: every transaction of the test period (2019-2020) at its natural
fraud rate, as the train and evaluate stages score it and as serving sees it.

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
                   + ("-dedup" if args.deduplicate else "") + ("-sampledtest" if args.undersample_test else ""))
    t = time.perf_counter()
    summary = preprocess(raw, case / "graph", feature_set=args.feature_set, deduplicate=args.deduplicate,
                         undersample_test=args.undersample_test)
    preprocess_s = time.perf_counter() - t
    t = time.perf_counter()
    r = train(case / "graph", case / "model", progress=False, seed=args.seed,
              gnn_params={"num_epochs": args.epochs})
    train_s = time.perf_counter() - t
    out = {"regime": args.regime, "seed": args.seed, "rows": args.rows, "feature_set": args.feature_set,
           "deduplicate": args.deduplicate, "undersample_test": args.undersample_test,
           "test_edges": int(len(r.test_labels)), "test_fraud": int(r.test_labels.sum()),
           "preprocess_s": preprocess_s, "train_s": train_s, "edges": summary.edges, "models": {}}
    for model, scores in r.test_scores.items():
        b = metrics.bootstrap(r.test_labels, {model: scores}, "auprc", n_boot=args.boot, seed=args.seed)
        out["models"][model] = {"auprc": b.values[model], "low": b.intervals[model][0],
                                "high": b.intervals[model][1]}
    for other in ("baseline", "graph_features"):  # paired: the same resampled rows for both models
        if other in r.test_scores:
            b = metrics.bootstrap(r.test_labels, {"gnn_xgboost": r.test_scores["gnn_xgboost"],
                                                  other: r.test_scores[other]}, "auprc",
                                  n_boot=args.boot, seed=args.seed)
            out[f"full_minus_{other}"] = {"delta": b.delta, "low": b.delta_interval[0], "high": b.delta_interval[1]}
    print(json.dumps(out))


def _cell(m: dict | None) -> str:
    return "" if m is None else f"{m['auprc']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"


def _delta(d: dict | None) -> str:
    return "" if d is None else f"{d['delta']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def _line(r: dict) -> str:
    return (f"| {r['regime']} | {r['seed']} | {r['rows']:,} | {r['test_edges']:,} ({r['test_fraud']:,}) | "
            + " | ".join(_cell(r["models"].get(m)) for m in MODELS)
            + f" | {_delta(r.get('full_minus_baseline'))} | {_delta(r.get('full_minus_graph_features'))} |")


HEADER = ("| regime | seed | rows | test transactions (fraud) | row-only baseline | graph features + XGBoost "
          "| full model (GNN + XGBoost) | full - baseline (paired) | full - graph features (paired) |\n"
          "|---|---|---|---|---|---|---|---|---|")


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
    parser.add_argument("--undersample-test", action="store_true",
                        help="test on the test period undersampled like training (the blueprint's selection; "
                             "labels decide which edges surround a test edge, so graph models look better "
                             "there than on the traffic they serve)")
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
          f"{'deduplicated' if args.deduplicate else 'no deduplication'}, "
          f"{'undersampled' if args.undersample_test else 'whole'} test period, {args.boot} bootstrap resamples", flush=True)
    print(HEADER, flush=True)
    results = []
    for regime in regimes:
        for seed in args.seeds:
            t = time.perf_counter()
            cmd = [sys.executable, __file__, "--child", "--regime", regime, "--seed", str(seed),
                   "--rows", str(args.rows), "--feature-set", args.feature_set, "--epochs", str(args.epochs),
                   "--boot", str(args.boot), "--work", args.work]
            cmd += ["--deduplicate"] if args.deduplicate else []
            cmd += ["--undersample-test"] if args.undersample_test else []
            child = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            if child.returncode != 0:
                raise SystemExit(f"{regime} seed {seed} failed (exit {child.returncode}):\n{child.stdout[-3000:]}")
            r = json.loads(child.stdout.strip().splitlines()[-1])
            r["wall_s"] = time.perf_counter() - t
            results.append(r)
            print(_line(r) + f"  <!-- {r['wall_s']:.0f} s: preprocess {r['preprocess_s']:.1f} s, "
                             f"train {r['train_s']:.1f} s -->", flush=True)
    selection = ("the test period undersampled like training (all fraud, a sample of the rest)"
                 if args.undersample_test else "every transaction of the test period (natural fraud rate)")
    print(f"\nTest AUPRC on {selection}:\n" + HEADER)
    for r in results:
        print(_line(r))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
