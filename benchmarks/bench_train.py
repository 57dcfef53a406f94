"""Benchmark the train stage (GNN + XGBoost, tabular baseline, export) with default hyperparameters.

    .venv/bin/python benchmarks/bench_train.py                       # full-size synthetic graph
    .venv/bin/python benchmarks/bench_train.py --rows 8000000        # a quicker look (~100k edges)
    .venv/bin/python benchmarks/bench_train.py --graph-dir runs/<id>/graph   # an existing graph

Without --graph-dir a synthetic TabFormer file of --rows rows is generated and preprocessed
first (in a child process, not timed). Training runs in its own child process, so its wall
time includes the imports, and its peak RSS and CPU time (``os.wait4``) are its own. Prints the phase
split (load, GNN, embedding, XGBoost, baseline, export), total wall, peak RSS, CPU time and test AUPRC of
both models. Target on the full-size synthetic graph (~330k edges) on a 2-core machine:
<= 60 s and <= 2 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FULL_ROWS = 24_386_900
PHASES = ("load", "gnn", "embed", "xgboost", "baseline", "export")


def _child(step: str, graph_dir: str, work: str, rows: int, device: str) -> None:
    """Runs inside the child process: one step, its result as JSON on the last stdout line."""
    if step == "prepare":
        from fraudlib.preprocess import preprocess
        from fraudlib.synthetic import generate

        raw = Path(work) / "card_transaction.v1.csv"
        generate(raw, rows, seed=0)
        summary = preprocess(raw, graph_dir)
        raw.unlink()
        result = {"edges": summary.edges}
    else:
        from fraudlib.training import train

        r = train(graph_dir, Path(work) / "model", device=device, progress=False)
        result = {"seconds": r.seconds, "device": r.device, "xgboost_rounds": r.xgboost_rounds,
                  "test_auprc": {m: r.metrics[m]["test"]["auprc"] for m in r.metrics}}
    print(json.dumps(result))


def _run_child(step: str, graph_dir: Path, work: Path, rows: int, device: str) -> dict:
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, __file__, "--child", step, "--graph-dir", str(graph_dir),
                              "--work", str(work), "--rows", str(rows), "--device", device],
                             stdout=subprocess.PIPE, text=True)
    stdout = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"step {step} failed (exit {code}); its output:\n{stdout}")
    result = json.loads(stdout.strip().splitlines()[-1])
    return {**result, "wall_s": time.perf_counter() - started, "peak_rss_gb": usage.ru_maxrss / 1e6,
            "cpu_s": usage.ru_utime + usage.ru_stime}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--graph-dir", help="an existing graph directory (default: generate one)")
    parser.add_argument("--rows", type=int, default=FULL_ROWS, help="synthetic rows to generate")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, args.graph_dir, args.work, args.rows, args.device)
        return 0

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(tmp)
        graph_dir = Path(args.graph_dir) if args.graph_dir else work / "graph"
        if not args.graph_dir:
            from fraudlib.synthetic import generate  # noqa: F401  (fail early when absent)

            prepared = _run_child("prepare", graph_dir, work, args.rows, args.device)
            print(f"prepared {args.rows:,} synthetic rows -> edges {prepared['edges']} "
                  f"({prepared['wall_s']:.1f} s, not counted)")
        r = _run_child("train", graph_dir, work, args.rows, args.device)
    from fraudlib.training import usable_cores

    print(f"graph: {graph_dir if args.graph_dir else 'synthetic'}; device {r['device']}; cores {usable_cores()}")
    for phase in PHASES:
        print(f"  {phase:<9} {r['seconds'][phase]:7.1f} s")
    # The controls ("baseline") run in a thread beside gnn, embed and xgboost: not added.
    sequential = sum(v for k, v in r["seconds"].items() if k != "baseline")
    print(f"  {'(imports and process start)':<9} {r['wall_s'] - sequential:5.1f} s   (baseline ran beside gnn..xgboost)")
    print(f"total wall {r['wall_s']:.1f} s, peak RSS {r['peak_rss_gb']:.2f} GB")
    # On a shared machine wall time swings with the load; CPU time much less.
    print(f"CPU time {r['cpu_s']:.1f} s (user + system), load average {os.getloadavg()[0]:.1f}")
    print(f"XGBoost rounds kept (early stopping): {r['xgboost_rounds']}")
    print("test AUPRC: " + ", ".join(f"{m} {v:.4f}" for m, v in r["test_auprc"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
