"""Benchmark the preprocess stage against a bare pyarrow parse of the same file.

    .venv/bin/python benchmarks/bench_preprocess.py                 # full size: 24,386,900 rows
    .venv/bin/python benchmarks/bench_preprocess.py --rows 3000000  # a quicker look
    .venv/bin/python benchmarks/bench_preprocess.py --raw card_transaction.v1.csv  # a real file

Each step runs in its own child process, so its wall time includes the imports and its peak
RSS (from ``os.wait4``) is its own. Steps: generate the synthetic file (skipped with --raw),
``pyarrow.csv.read_csv`` of the whole file with default options (the floor any CSV-based
preprocessing pays), then ``fraudlib.preprocess.preprocess``. Both reads find the file in the
page cache (generate or the parse warms it). Preprocess runs three times: as the blueprint does it
(its features, deduplicated non-fraud rows, the undersampled test period), with the causal
features on those same rows (the features' own cost), and with the defaults (causal
features, no deduplication, every transaction of the test period).

Targets at full size on a 2-core machine (issues 12 and 16): the blueprint's preprocessing
<= 10 s, <= 2x the bare parse, <= 3 GB peak RSS; with the causal features <= 1.3x the
blueprint's time and <= 3 GB.
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


def _child(step: str, raw: str, out: str, rows: int) -> None:  # step: generate, parse, blueprint, causal
    """Runs inside the child process: one step, its result as JSON on the last stdout line."""
    if step == "generate":
        from fraudlib.synthetic import generate

        result = {"rows": generate(raw, rows, seed=0).rows}
    elif step == "parse":
        import pyarrow.csv as pacsv

        result = {"rows": pacsv.read_csv(raw).num_rows}
    else:
        from fraudlib.preprocess import preprocess

        # blueprint: the blueprint's preprocessing (its features, deduplication and undersampled
        # test period), what the project did before issue 12; features: the same rows with the
        # causal features (their cost alone); causal: today's defaults (the causal features, no
        # deduplication, every transaction of the test period).
        summary = preprocess(raw, out, feature_set="blueprint" if step == "blueprint" else "causal",
                             deduplicate=step != "causal", undersample_test=step != "causal")
        history = Path(out) / "history.parquet"
        result = {"rows": summary.rows, "edges": summary.edges, "dims": summary.dims,
                  "history_mb": history.stat().st_size / 1e6 if history.is_file() else None}
    print(json.dumps(result))


def _compile_features() -> None:
    """Compile (and cache on disk) the causal features' numba kernels once, before any step
    is timed: a fresh checkout compiles them on its first use (a few seconds, once)."""
    import numpy as np

    from fraudlib import features

    rng = np.random.default_rng(0)
    n = 10_000
    stream = features.Stream(card=rng.integers(0, 500, n).astype(np.int32), merchant=rng.integers(0, 10**9, n),
                             minute=rng.integers(0, 10**6, n).astype(np.int32), amount=rng.normal(50, 30, n),
                             fraud=rng.integers(0, 2, n).astype(np.int8))
    features.compute(stream, np.arange(0, n, 7))


def _measure(step: str, raw: Path, out: Path, rows: int) -> dict:
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, __file__, "--child", step, "--raw", str(raw), "--out", str(out),
                              "--rows", str(rows)], stdout=subprocess.PIPE, text=True)
    stdout = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"step {step} failed (exit {child.returncode}); its output:\n{stdout}")
    result = json.loads(stdout.strip().splitlines()[-1])
    return {"step": step, "seconds": seconds, "peak_rss_gb": usage.ru_maxrss / 1e6, **result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=FULL_ROWS, help="synthetic rows (default: the real file's)")
    parser.add_argument("--raw", type=Path, help="benchmark this TabFormer file instead of a synthetic one")
    parser.add_argument("--workdir", type=Path, help="where the synthetic file and graph go (default: a temp dir)")
    parser.add_argument("--child", choices=("generate", "parse", "blueprint", "features", "causal"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, str(args.raw), args.out, args.rows)
        return 0

    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    _compile_features()
    with tempfile.TemporaryDirectory(prefix="bench_preprocess.", dir=args.workdir) as work:
        work = Path(work)
        raw = args.raw or work / "card_transaction.v1.csv"
        steps = [] if args.raw else [_measure("generate", raw, work / "graph", args.rows)]
        steps += [_measure("parse", raw, work / "graph", args.rows),
                  _measure("blueprint", raw, work / "graph", args.rows),
                  _measure("features", raw, work / "graph", args.rows),
                  _measure("causal", raw, work / "graph", args.rows)]
        size_gb = raw.stat().st_size / 1e9

    print(f"input: {raw if args.raw else 'synthetic'}, {steps[-1]['rows']:,} rows, {size_gb:.2f} GB; "
          f"{os.cpu_count()} CPUs")
    print(f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'step':<12}{'wall s':>9}{'peak RSS GB':>13}{'rows/s':>14}")
    for s in steps:
        print(f"{s['step']:<12}{s['seconds']:>9.2f}{s['peak_rss_gb']:>13.2f}{s['rows'] / s['seconds']:>14,.0f}")
    parse, blueprint, feats, prep = steps[-4:]
    print(f"blueprint preprocess / pyarrow parse: {blueprint['seconds'] / parse['seconds']:.2f}x")
    print(f"causal features on the blueprint's rows / blueprint: {feats['seconds'] / blueprint['seconds']:.2f}x time, "
          f"{feats['peak_rss_gb']:.2f} vs {blueprint['peak_rss_gb']:.2f} GB peak RSS")
    print(f"defaults (causal features, whole test period) / blueprint: {prep['seconds'] / blueprint['seconds']:.2f}x "
          f"time, {prep['peak_rss_gb']:.2f} GB peak RSS")
    print(f"graph: edges {prep['edges']}, feature dims {prep['dims']} (blueprint: {blueprint['dims']}); "
          f"history for scoring: {prep['history_mb']:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
