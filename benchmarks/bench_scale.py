"""Scale benchmark (issue 16): preprocess and train with the pandas and the dask engine at one size.

    .venv/bin/python benchmarks/bench_scale.py --rows 2000000      # a synthetic file of that size
    .venv/bin/python benchmarks/bench_scale.py --rows 100000000 --files 16 --engines dask --no-parse
    .venv/bin/python benchmarks/bench_scale.py --raw 'data/part-*.csv' --engines dask

Each step runs in its own child process, so its wall time includes the imports (and for dask
starting the LocalCluster sized to this machine, then stopping it). Peak memory is the peak of
the summed RSS of the child and all its descendants (the Dask nannies and workers), sampled
every 0.1 s: it counts pages shared between processes once per process, so it errs high.
Steps: generate the synthetic file, or ``--files`` files (skipped with --raw), a bare
``pyarrow.csv.read_csv`` of the file (the floor of any CSV parse; skipped for a glob), then for
each engine ``fraudlib.preprocess`` (default settings: causal features) and
``fraudlib.training.train`` on the graph it wrote (the stage's defaults; dask: XGBoost through
``xgboost.dask``). Both engines must write the same graph: the benchmark fails when their
manifest hashes differ. A step whose processes together pass ``--memory-limit-gb`` is killed
(its row says so, with the peak and the time it had run): on a shared machine a step that
does not fit must not take the others down.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

SAMPLE_S = 0.1


def _child(step: str, raw: str, out: str, rows: int, feature_partition_rows: int | None, files: int) -> None:
    """Runs inside the child process: one step, its result as JSON on the last stdout line."""
    if step == "generate":
        from fraudlib.synthetic import generate

        target = str(Path(raw).parent) if files > 1 else raw  # the folder of the parts
        result = {"rows": generate(target, rows, seed=0, files=files).rows, "files": files}
    elif step.startswith("train-"):
        from fraudlib import training

        r = training.train(raw, out, engine=step.removeprefix("train-"), progress=False)
        result = {"engine": r.engine, "graph_size": r.graph_size, "seconds_by_phase": {k: round(v, 1) for k, v in r.seconds.items()},
                  "xgboost_rounds": r.xgboost_rounds, "test_auprc": {m: round(v["test"]["auprc"], 4) for m, v in r.metrics.items()},
                  "peak_rss_gb_by_training": {k: round(v / 1e9, 2) for k, v in r.peak_memory.items()}}
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


def _measure(step: str, raw: str, out: Path, rows: int, limit_gb: float, feature_partition_rows: int | None = None,
             files: int = 1) -> dict:
    load = os.getloadavg()[0]
    started = time.perf_counter()
    extra = ["--feature-partition-rows", str(feature_partition_rows)] if feature_partition_rows else []
    child = subprocess.Popen([sys.executable, __file__, "--child", step, "--raw", raw, "--out", str(out),
                              "--rows", str(rows), "--files", str(files), *extra], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    peak, done, killed = [0], threading.Event(), threading.Event()

    def sample() -> None:
        process = psutil.Process(child.pid)
        while not done.is_set():
            try:
                peak[0] = max(peak[0], _tree_rss(process))
            except psutil.NoSuchProcess:
                return
            if peak[0] > limit_gb * 1e9 and not killed.is_set():
                killed.set()
                os.killpg(child.pid, signal.SIGKILL)  # the child and its workers (one session)
            done.wait(SAMPLE_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout = child.stdout.read()
    child.wait()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    row = {"step": step, "seconds": round(seconds, 2), "peak_rss_gb_all_processes": round(peak[0] / 1e9, 2),
           "load_at_start": round(load, 2)}
    if killed.is_set():
        return {**row, "killed": f"above --memory-limit-gb {limit_gb:g} after {seconds:.1f} s"}
    if child.returncode != 0:
        raise SystemExit(f"step {step} failed (exit {child.returncode}); its output:\n{stdout}")
    return {**row, **json.loads(stdout.strip().splitlines()[-1])}


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
    parser.add_argument("--no-train", action="store_true", help="skip training on each engine's graph")
    parser.add_argument("--files", type=int, default=1,
                        help="write the synthetic input as this many files (part-0000.csv, ...) and read their glob")
    parser.add_argument("--memory-limit-gb", type=float, default=9.0,
                        help="kill a step whose processes together pass this RSS (default 9)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, args.raw, args.out, args.rows, args.feature_partition_rows, args.files)
        return 0

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    raw = args.raw
    if raw is None:
        if args.files > 1:
            raw = str(workdir / f"synthetic-{args.rows}-{args.files}" / "part-*.csv")
            ready = len(glob.glob(raw)) == args.files
        else:
            raw = str(workdir / f"synthetic-{args.rows}.csv")
            ready = Path(raw).is_file()
        if not ready:
            results.append(_measure("generate", raw, workdir, args.rows, args.memory_limit_gb, files=args.files))
            print(json.dumps(results[-1]), flush=True)
    if not glob.has_magic(raw) and not args.no_parse:
        results.append(_measure("parse", raw, workdir, args.rows, args.memory_limit_gb))
        print(json.dumps(results[-1]), flush=True)
    for engine in args.engines.split(","):
        graph = workdir / f"graph-{engine}"
        results.append(_measure(engine, raw, graph, args.rows, args.memory_limit_gb, args.feature_partition_rows))
        print(json.dumps(results[-1]), flush=True)
        if not args.no_train and "killed" not in results[-1]:
            results.append(_measure(f"train-{engine}", str(graph), workdir / f"model-{engine}", args.rows,
                                    args.memory_limit_gb))
            print(json.dumps(results[-1]), flush=True)
    hashes = {r["manifest_hash"] for r in results if "manifest_hash" in r}
    print(f"machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.1f} GiB; "
          f"load average now {os.getloadavg()[0]:.2f}; input {raw}")
    if len(hashes) > 1:
        print("the engines wrote different graphs (manifest hashes differ)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
