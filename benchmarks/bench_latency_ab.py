"""Single-transaction latency of several model packages, side by side in one real Triton.

This 2-vCPU VM's scheduling noise moves a p50 by 30% and a p99 by 2x from one minute to the
next, so two packages measured one after the other cannot be compared. Here every package is
loaded under its own model name in one embedded Triton and the requests alternate between
them (request i goes to every package in turn): all see the same noise.

    .venv/bin/python benchmarks/bench_latency_ab.py --graph-dir runs/<run>/graph \\
        <old package>/prediction_and_shapley <new package>/prediction_and_shapley

A request is one transaction as a 1-edge graph (its card, its merchant, its edge features),
HTTP with binary tensors, PREDICTION only, concurrency 1. Alternating also keeps both CPUs
busier than bench_triton.py's one-model loop does, so tails here are shorter than there:
compare packages with this script, report the target with bench_triton.py.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fraudlib.graph_store import read_part
from fraudlib.triton_repo import graph_inputs
from fraudlib.triton_server import EmbeddedTriton, TritonClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_triton import single_transactions  # noqa: E402


def serve_side_by_side(packages: list[Path], repository: Path) -> list[str]:
    """Copy each package into ``repository`` under its own model name; returns the names."""
    names = []
    for k, package in enumerate(packages):
        name = f"package_{k}"
        shutil.copytree(package, repository / name)
        config = repository / name / "config.pbtxt"
        config.write_text(re.sub(r'^name: ".*"$', f'name: "{name}"', config.read_text(), flags=re.M))
        names.append(name)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("packages", type=Path, nargs="+", help="model package directories to compare")
    parser.add_argument("--graph-dir", type=Path, required=True,
                        help="graph directory whose test edges are the transactions sent")
    parser.add_argument("--requests", type=int, default=3000, help="timed requests per package")
    args = parser.parse_args(argv)

    graph = graph_inputs(read_part(args.graph_dir, "test"))
    requests = single_transactions(graph, args.requests)
    with tempfile.TemporaryDirectory(prefix="bench_ab_") as tmp:
        tmp = Path(tmp)
        (tmp / "repository").mkdir()
        names = serve_side_by_side(args.packages, tmp / "repository")
        with EmbeddedTriton(tmp / "repository", tmp / "triton.log") as server, server.client() as client:
            for name in names:
                client.load_model(name)
            with TritonClient(server.url) as timed:
                for request in requests[:200]:  # warm-up
                    for name in names:
                        timed.infer(name, request, outputs=["PREDICTION"])
                latencies = {name: [] for name in names}
                for request in requests:
                    for name in names:
                        t = time.perf_counter()
                        timed.infer(name, request, outputs=["PREDICTION"])
                        latencies[name].append(time.perf_counter() - t)
    figures = []
    for name, package in zip(names, args.packages):
        ms = np.asarray(latencies[name]) * 1000
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        figures.append({"package": str(package), "p50_ms": p50, "p90_ms": p90, "p99_ms": p99})
        print(f"{package}: p50 {p50:.2f} ms, p90 {p90:.2f} ms, p99 {p99:.2f} ms ({ms.size} requests)")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
