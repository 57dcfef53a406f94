"""Where the train stage's time goes after training: the stage run on a graph directory with
timers around training, the report's plots and the MLflow logging (the training dataset, the
logged model whose input example MLflow scores in its receptive field).

    FRAUD_RUNS_DIR=/tmp/bench-runs .venv/bin/python benchmarks/bench_train_stage.py --graph-dir runs/<run>/graph

Prints each timed step's seconds and when it ended, then the stage's total. Use a scratch
FRAUD_RUNS_DIR: the stage logs an MLflow run there. At 100M rows (docs/benchmarks.md) the
graph directory comes from `run_pipeline.py --through preprocess`.
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--graph-dir", required=True, type=Path, help="a preprocessed graph directory")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="where the stage writes its model and plots (default: <graph-dir>/../bench-train-stage)")
    args = parser.parse_args()
    import mlflow
    import mlflow.pyfunc

    from fraudlib import plots, scoring, tracking, training
    from fraudlib.stages import train as stage

    started = time.perf_counter()

    def timed(module, name: str) -> None:
        function = getattr(module, name)

        @functools.wraps(function)
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                print(f"{module.__name__}.{name}: {time.perf_counter() - t:.1f} s "
                      f"(ended at {time.perf_counter() - started:.1f} s)", flush=True)
        setattr(module, name, wrapper)

    for module, name in [(training, "train"), (plots, "pr_curves"), (tracking, "log_training_run"),
                         (tracking, "_log_training_data"), (tracking, "_log_model"), (mlflow.pyfunc, "log_model"),
                         (scoring, "score_in_process")]:
        timed(module, name)
    run_dir = args.run_dir or args.graph_dir.resolve().parent / "bench-train-stage"
    out = stage.run(stage.Params(graph_dir=str(args.graph_dir), run_dir=str(run_dir), engine="pandas"))
    print(f"train stage: {time.perf_counter() - started:.1f} s; training phases "
          + ", ".join(f"{k} {v:.1f}" for k, v in out.seconds.items())
          + f"; test AUPRC {out.test_auprc:.4f} (row-only {out.baseline_test_auprc:.4f})")


if __name__ == "__main__":
    main()
