"""What evaluating on every transaction of a test period costs: the metrics, the paired
bootstrap, the report's plots and writing the test part, on synthetic scores of the full-size
test period's shape (1,519,288 transactions, 0.1% fraud, two correlated models).

    .venv/bin/python benchmarks/bench_metrics.py                 # 1,519,288 rows, 1,000 resamples
    .venv/bin/python benchmarks/bench_metrics.py --rows 300000 --boot 200

Prints seconds per step. Each step runs once in this process (numpy and pyarrow warm after the
first), so the figures are a step's own cost, not a stage's wall time.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_519_288, help="test transactions (default: the full-size test period)")
    parser.add_argument("--boot", type=int, default=1000, help="bootstrap resamples (default 1000, the evaluate stage's)")
    args = parser.parse_args()
    from fraudlib import graph_store, metrics, plots

    rng = np.random.default_rng(0)
    labels = (rng.random(args.rows) < 0.001).astype(np.int64)
    champion = rng.random(args.rows) + labels * 0.5
    challenger = champion + rng.normal(0, 0.1, args.rows)
    print(f"{args.rows:,} transactions ({int(labels.sum()):,} fraud), {args.boot} resamples, "
          f"load average {os.getloadavg()[0]:.1f}")

    def timed(name: str, work) -> None:
        started = time.perf_counter()
        work()
        print(f"  {name:<52} {time.perf_counter() - started:6.2f} s")

    timed("metrics.report (AUPRC, ROC AUC, thresholds)", lambda: metrics.report(labels, challenger, 0.5))
    timed("paired AUPRC bootstrap of two models", lambda: metrics.bootstrap(
        labels, {"challenger": challenger, "champion": champion}, "auprc", n_boot=args.boot))
    timed("plots.pr_curves of two models", lambda: plots.close(plots.pr_curves(
        labels, {"challenger": challenger, "champion": champion})))
    timed("plots.confusion", lambda: plots.close(plots.confusion(labels, {"challenger": challenger}, 0.5)))
    table = np.hstack([rng.integers(0, 2, (args.rows, 32)), rng.normal(size=(args.rows, 20))]).astype(np.float32)
    with tempfile.TemporaryDirectory() as work:
        timed("test edge features as CSV (32 binary + 20 real columns)", lambda: graph_store._write_table(
            Path(work) / "attr.csv", [f"c{i}" for i in range(table.shape[1])], table))


if __name__ == "__main__":
    main()
