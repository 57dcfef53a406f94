"""GPU check (run on a GPU host): train the same graph on CUDA and on CPU, compare.

    python benchmarks/gpu_check.py [--rows 24386900]

Generates and preprocesses a synthetic TabFormer file (timed), then trains with default
hyperparameters twice, ``device="cuda"`` and ``device="cpu"``, and prints per-phase seconds
and test metrics of both, and whether they agree. XGBoost runs on the CPU when the installed
xgboost has no CUDA support (e.g. the small ``xgboost-cpu`` wheel), so the GNN phases are the
CUDA-vs-CPU comparison.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import xgboost as xgb

from fraudlib import training
from fraudlib.preprocess import preprocess
from fraudlib.synthetic import generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=24_386_900)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check needs a GPU host")
    if not xgb.build_info().get("USE_CUDA"):
        cpu_xgb = training._xgb_params
        training._xgb_params = lambda s, device, seed: cpu_xgb(s, "cpu", seed)
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}; xgboost {xgb.__version__} "
          f"(CUDA: {bool(xgb.build_info().get('USE_CUDA'))})", flush=True)
    work = Path(tempfile.mkdtemp())
    t = time.perf_counter()
    generate(work / "raw.csv", args.rows, seed=0)
    print(f"generate {args.rows:,} rows: {time.perf_counter() - t:.1f} s", flush=True)
    t = time.perf_counter()
    summary = preprocess(work / "raw.csv", work / "graph")
    print(f"preprocess: {time.perf_counter() - t:.1f} s, edges {summary.edges}", flush=True)
    results = {}
    for device in ("cuda", "cpu"):
        r = training.train(work / "graph", work / f"model-{device}", device=device, progress=False)
        results[device] = r
        print(json.dumps({"device": r.device, "seconds": {k: round(v, 2) for k, v in r.seconds.items()},
                          "gnn_final_val_auprc": r.curve["val_auprc"][-1],
                          "test_gnn_xgboost": r.metrics["gnn_xgboost"]["test"],
                          "test_baseline": r.metrics["baseline"]["test"]}), flush=True)
    a, b = (results[d].metrics["gnn_xgboost"]["test"]["auprc"] for d in ("cuda", "cpu"))
    print(f"test AUPRC cuda {a:.4f} vs cpu {b:.4f}: difference {abs(a - b):.4f}")


if __name__ == "__main__":
    main()
