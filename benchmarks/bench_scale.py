"""Scale benchmark (issue 16): preprocess with the pandas and the dask engine at one size.

    .venv/bin/python benchmarks/bench_scale.py --rows 2000000      # a synthetic file of that size
    .venv/bin/python benchmarks/bench_scale.py --raw 'data/part-*.csv' --engines dask

Each step runs in its own child process, so its wall time includes the imports (and for dask
starting the LocalCluster sized to this machine, then stopping it). Peak memory is the peak of
the summed RSS of the child and all its descendants (the Dask nannies and workers), sampled
every 0.1 s: it counts pages shared between processes once per process, so it errs high.
Steps: generate the synthetic file (skipped with --raw), a bare ``pyarrow.csv.read_csv`` of
the file (the floor of any CSV parse; skipped for a glob), then ``fraudlib.preprocess`` with
each engine (default settings: causal features). Both engines must write the same graph: the
benchmark fails when their manifest hashes differ.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

SAMPLE_S = 0.1


def _child(step: str, raw: str, out: str, rows: int, feature_partition_rows: int | None) -> None:
    """Runs inside the child process: one step, its result as JSON on the last stdout line."""
    if step == "generate":
        from fraudlib.synthetic import generate

        result = {"rows": generate(raw, rows, seed=0).rows}
    elif step == "parse":
        import pyarrow.csv as pacsv

        result = {"rows": pacsv.read_csv(raw).num_rows}
    else:
        from fraudlib import dask_engine
        from fraudlib.preprocess import preprocess

        if feature_partition_rows:
            dask_engine.FEATURE_PARTITION_ROWS = feature_partition_rows
        summary = preprocess(raw, out, engine=step)
        result = {"rows": summary.rows, "edges": summary.edges, "manifest_hash": summary.manifest_hash,
                  "preprocess_seconds": round(summary.seconds, 2), "engine": summary.engine}
    print(json.dumps(result))


def _tree_rss(process: psutil.Process) -> int:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def _measure(step: str, raw: str, out: Path, rows: int, feature_partition_rows: int | None = None) -> dict:
    started = time.perf_counter()
    extra = ["--feature-partition-rows", str(feature_partition_rows)] if feature_partition_rows else []
    child = subprocess.Popen([sys.executable, __file__, "--child", step, "--raw", raw, "--out", str(out),
                              "--rows", str(rows), *extra], stdout=subprocess.PIPE, text=True)
    peak, done = [0], threading.Event()

    def sample() -> None:
        process = psutil.Process(child.pid)
        while not done.is_set():
            try:
                peak[0] = max(peak[0], _tree_rss(process))
            except psutil.NoSuchProcess:
                return
            done.wait(SAMPLE_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout = child.stdout.read()
    child.wait()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    if child.returncode != 0:
        raise SystemExit(f"step {step} failed (exit {child.returncode}); its output:\n{stdout}")
    result = json.loads(stdout.strip().splitlines()[-1])
    return {"step": step, "seconds": round(seconds, 2), "peak_rss_gb_all_processes": round(peak[0] / 1e9, 2), **result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="synthetic rows (default 2,000,000)")
    parser.add_argument("--raw", help="benchmark this TabFormer file (or quoted glob) instead of a synthetic one")
    parser.add_argument("--engines", default="pandas,dask", help="comma-separated, in order (default pandas,dask)")
    parser.add_argument("--workdir", type=Path, help="where the synthetic file and graphs go (default: a temp dir)")
    parser.add_argument("--feature-partition-rows", type=int,
                        help="dask: set dask_engine.FEATURE_PARTITION_ROWS (default 32M: smaller streams "
                             "compute their causal features in one pass in the driver)")
    parser.add_argument("--no-parse", action="store_true", help="skip the bare pyarrow parse")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, args.raw, args.out, args.rows, args.feature_partition_rows)
        return 0

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    raw = args.raw
    if raw is None:
        raw = str(workdir / f"synthetic-{args.rows}.csv")
        if not Path(raw).is_file():
            results.append(_measure("generate", raw, workdir, args.rows))
    if not glob.has_magic(raw) and not args.no_parse:
        results.append(_measure("parse", raw, workdir, args.rows))
    for engine in args.engines.split(","):
        results.append(_measure(engine, raw, workdir / f"graph-{engine}", args.rows, args.feature_partition_rows))
    for r in results:
        print(json.dumps(r))
    hashes = {r["manifest_hash"] for r in results if "manifest_hash" in r}
    print(f"machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.1f} GiB; "
          f"load average before the last step {os.getloadavg()[0]:.2f}; input {raw}")
    if len(hashes) > 1:
        print("the engines wrote different graphs (manifest hashes differ)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
